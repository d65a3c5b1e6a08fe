from epp.sim.tokenizer import OUTPUT_WORDS, SimTokenizer, render_chat


def test_deterministic_and_prefix_stable() -> None:
    tok = SimTokenizer()
    a = tok.encode("You are a helpful assistant. Answer briefly.")
    assert a == SimTokenizer().encode("You are a helpful assistant. Answer briefly.")
    b = tok.encode("You are a helpful assistant. Answer briefly. And more text here")
    assert b[: len(a) - 1] == a[:-1]
    # Roughly four characters per token, like real vocabularies.
    text = "the quick brown fox jumps over the lazy dog " * 50
    assert 0.15 < len(tok.encode(text)) / len(text) < 0.4


def test_generated_text_retokenizes_to_the_same_ids() -> None:
    tok = SimTokenizer()
    ids = [tok.output_token(i) for i in range(50)]
    assert tok.encode(tok.decode(ids)) == ids
    assert len(set(OUTPUT_WORDS)) == len(OUTPUT_WORDS)


def test_chat_template_is_chatml() -> None:
    text = render_chat([{"role": "system", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
