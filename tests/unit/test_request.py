import pytest

from epp.requestcontrol.parsing import parse_body
from epp.requestcontrol.refused import Refused


def test_chat_and_completion_bodies() -> None:
    chat = parse_body("r", "/v1/chat/completions", {}, b'{"model":"m","stream":true,"messages":'
                      b'[{"role":"system","content":"be brief"},'
                      b'{"role":"user","content":[{"type":"text","text":"hi"}]}]}')
    assert chat.model == "m" and chat.body is not None and chat.body["stream"] is True
    assert chat.prompt == "<system>be brief<user>hi"
    comp = parse_body("r", "/v1/completions", {}, b'{"model":"m","prompt":"once upon"}')
    assert comp.prompt == "once upon" and not comp.chat
    ids = parse_body("r", "/v1/completions", {}, b'{"model":"m","prompt":[1,2,3]}')
    assert ids.prompt == "1 2 3"


@pytest.mark.parametrize(("body", "message"), [
    (b"", "empty"), (b"{nope", "not valid JSON"), (b"[1]", "JSON object"), (b'{"prompt":"x"}', "missing 'model'"),
])
def test_bad_bodies_are_400(body: bytes, message: str) -> None:
    with pytest.raises(Refused) as e:
        parse_body("r", "/v1/completions", {}, body)
    assert e.value.status == 400 and message in e.value.message
    assert b'"code":400' in e.value.body()
