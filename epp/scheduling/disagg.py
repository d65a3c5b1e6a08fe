"""Prefill/decode disaggregation as the reference configures it.

- ``disagg-profile-handler``: two scheduling profiles, ``profiles.decode`` (default ``decode``,
  always run; its pick is the request's endpoint) and ``profiles.prefill`` (default
  ``prefill``), run when the decider named in ``deciders.prefill`` says so; the prefill pod is
  named to the decode pod in ``x-prefiller-host-port`` (llm-d's routing sidecar on the decode pod
  has it compute the prompt and pull its KV blocks). Without ``deciders.prefill`` no request is
  disaggregated. The encode stage (``deciders.encode``) is refused: epp routes text.
- ``prefix-based-pd-decider``: disaggregate when the prompt part not cached on the chosen decode
  pod is at least ``nonCachedTokens`` (default 0, which turns it off), for prompts of at least
  ``promptTokens`` (default 0: any). It reads the decode profile's prefix match.
- ``always-disagg-pd-decider``: every request.
"""

from __future__ import annotations

from typing import ClassVar

from epp.request import InferenceRequest
from epp.scheduling.contract import Decider, ProfileHandler
from epp.scheduling.params import Params
from epp.scheduling.types import MATCHED_TOKENS, ConfigError, Decision, prompt_tokens

ENCODE = "multimodal encode disaggregation is not implemented"


class DisaggProfileHandler(ProfileHandler):
    type_name: ClassVar[str] = "disagg-profile-handler"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        profiles = params.section("profiles")
        self.decode_profile = "decode"
        self.prefill_profile = "prefill"
        if profiles is not None:
            self.decode_profile = profiles.text("decode", "decode") or "decode"
            self.prefill_profile = profiles.text("prefill", "prefill") or "prefill"
            profiles.text("encode", "encode")  # names a profile only the encode stage would run
            profiles.done()
        deciders = params.section("deciders")
        self.decider_name: str | None = None
        if deciders is not None:
            self.decider_name = deciders.text("prefill") or None
            if deciders.text("encode"):
                raise ConfigError(f"{params.path}.deciders.encode", f"not supported by epp ({ENCODE})")
            deciders.done()
        params.done()

    def profile_names(self) -> tuple[str, ...]:
        """The profiles this handler runs: decode, and prefill when a decider is set."""
        return (self.decode_profile, self.prefill_profile) if self.decider_name else (self.decode_profile,)


class PrefixBasedPDDecider(Decider):
    type_name: ClassVar[str] = "prefix-based-pd-decider"
    needs_prefix_match: ClassVar[bool] = True

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.non_cached = params.int("nonCachedTokens", 0, minimum=0)
        self.prompt_tokens = params.int("promptTokens", 0, minimum=0)
        params.done()

    def disaggregate(self, request: InferenceRequest, decision: Decision) -> bool:
        if not self.non_cached:
            return False
        cycle = decision.cycle
        prompt = prompt_tokens(cycle, request.prompt)
        if self.prompt_tokens and prompt < self.prompt_tokens:
            return False
        matched = cycle.get(MATCHED_TOKENS)
        if matched is None:  # no prefix match on the decode pod (the loader requires a matcher)
            return False
        return prompt - matched.get(decision.primary, 0) >= self.non_cached


class AlwaysDisaggPDDecider(Decider):
    type_name: ClassVar[str] = "always-disagg-pd-decider"
    needs_prefix_match: ClassVar[bool] = False

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def disaggregate(self, request: InferenceRequest, decision: Decision) -> bool:
        return True


DISAGG_PLUGINS = (DisaggProfileHandler, PrefixBasedPDDecider, AlwaysDisaggPDDecider)
