"""The ext_proc state machine, driven directly (no network), and its hand-encoded messages."""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.server.extproc import _streamed


def test_hand_encoded_streamed_bodies_decode_exactly_like_upb_builds_them() -> None:
    for phase in ("request", "response"):
        for body in (b"", b"x", b"y" * 200, b"z" * 70_000):
            for eos in (False, True):
                common = pb.CommonResponse(body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=eos)))
                if phase == "request":
                    want = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
                else:
                    want = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
                got = pb.ProcessingResponse.FromString(_streamed(phase, body, eos))
                assert got == want
                assert _streamed(phase, body, eos) == want.SerializeToString()
