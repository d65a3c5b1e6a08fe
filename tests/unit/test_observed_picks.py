"""ObservedPicks as pure code: tokens claimed by role, unclaimed ends finished after the timeout,
the usage sample."""

from __future__ import annotations

from dataclasses import dataclass

from epp.requestcontrol.usage import UsageReader
from epp.server.observed import ALL, END, FIRST, ObservedPicks


@dataclass
class Pick:
    usage_required: bool = False
    reader: UsageReader | None = None
    finished: int = 0

    def finish(self) -> None:
        self.finished += 1


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def picks(sample: float = 0.1) -> tuple[ObservedPicks, Clock]:
    clock = Clock()
    return ObservedPicks(None, attach_timeout=5.0, usage_sample=sample, clock=clock), clock


def test_each_role_claims_a_pick_once_and_the_entry_goes_with_the_last() -> None:
    observed, _ = picks()
    pick = Pick()
    token = observed.register(pick)
    assert observed.claim(token, FIRST) is pick
    assert observed.claim(token, FIRST) is None  # a second first observer gets nothing
    assert len(observed) == 1
    assert observed.claim(token, END) is pick
    assert len(observed) == 0
    assert observed.claim(token, END) is None
    assert observed.claim("unknown", ALL) is None


def test_an_observer_reading_everything_claims_both_roles() -> None:
    observed, _ = picks()
    token = observed.register(Pick())
    assert observed.claim(token, ALL) is not None
    assert len(observed) == 0


def test_a_pick_whose_end_nobody_claims_is_finished_after_the_timeout_once() -> None:
    observed, clock = picks()
    lost, ended = Pick(), Pick()
    lost_token = observed.register(lost)
    ended_token = observed.register(ended)
    assert observed.claim(lost_token, FIRST) is lost  # its first bytes seen, but no end observer
    assert observed.claim(ended_token, END) is ended  # its end observer finishes it itself
    clock.t = 4.9
    observed.sweep()
    assert lost.finished == 0
    clock.t = 5.1
    observed.sweep()
    observed.sweep()
    assert (lost.finished, ended.finished) == (1, 0)
    assert len(observed) == 0
    assert observed.claim(lost_token, END) is None  # too late: already finished


def test_streams_are_read_to_their_end_when_their_usage_is_needed_or_sampled() -> None:
    observed, _ = picks(sample=0.25)
    reading = Pick(reader=UsageReader(strip=False))
    assert [observed.read_to_end(reading) for _ in range(8)] == [False, False, False, True] * 2
    assert observed.read_to_end(Pick(usage_required=True))
    assert not observed.read_to_end(Pick())  # nothing reads its usage
    none, _ = picks(sample=0.0)
    assert not any(none.read_to_end(reading) for _ in range(10))
