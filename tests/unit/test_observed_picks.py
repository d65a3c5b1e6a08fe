"""ObservedPicks as pure code: tokens claimed by role, unclaimed ends finished after the timeout,
the usage sample."""

from __future__ import annotations

from dataclasses import dataclass

from epp.requestcontrol.usage import UsageReader
from epp.server.observed import ALL, END, END_GRACE_S, FIRST, ObservedPicks, reads_to_end


@dataclass
class Pick:
    usage_required: bool = False
    reader: UsageReader | None = None
    finished: int = 0
    handed_over: int = 0

    @property
    def done(self) -> bool:
        return self.finished > 0

    def finish(self) -> None:
        self.finished += 1

    def hand_over(self) -> None:
        self.handed_over += 1


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
    claim = observed.claim(token, FIRST)
    assert claim is not None and claim.pick is pick
    assert observed.claim(token, FIRST) is None  # a second first observer gets nothing
    assert len(observed) == 1
    claim = observed.claim(token, END)
    assert claim is not None and claim.pick is pick
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
    first = observed.claim(lost_token, FIRST)  # its first bytes seen, but no end observer
    end = observed.claim(ended_token, END)  # its end observer finishes it itself
    assert first is not None and first.pick is lost
    assert end is not None and end.pick is ended
    clock.t = 4.9
    observed.sweep()
    assert lost.finished == 0
    clock.t = 5.1
    observed.sweep()
    observed.sweep()
    assert (lost.finished, ended.finished) == (1, 0)
    assert len(observed) == 1  # the ended one's first observer may still claim it, while it is in flight
    assert observed.claim(lost_token, END) is None  # too late: already finished
    ended.finish()
    clock.t = 10.2
    observed.sweep()
    assert len(observed) == 0


def test_streams_are_read_to_their_end_when_their_usage_is_needed_or_sampled() -> None:
    """Decided when the pick is registered: its token says so to whichever process its observer
    stream reaches."""
    observed, _ = picks(sample=0.25)

    def reads(pick: Pick) -> bool:
        token = observed.register(pick)
        claim = observed.claim(token, FIRST)
        assert claim is not None
        assert reads_to_end(token) == claim.read_to_end
        return claim.read_to_end

    reading = Pick(reader=UsageReader(strip=False))
    assert [reads(reading) for _ in range(8)] == [False, False, False, True] * 2
    assert reads(Pick(usage_required=True))
    assert not reads(Pick())  # nothing reads its usage
    none, _ = picks(sample=0.0)
    assert not any(none.claim(none.register(reading), FIRST).read_to_end for _ in range(10))  # type: ignore[union-attr]


def test_tokens_are_unique_per_registry_and_differ_between_registries() -> None:
    a, _ = picks()
    b, _ = picks()
    tokens = [a.register(Pick()) for _ in range(1000)] + [b.register(Pick()) for _ in range(1000)]
    assert len(set(tokens)) == 2000


def test_an_end_waits_a_grace_for_the_observer_reading_to_the_end() -> None:
    """The end observer's close can come before the first observer's last chunk (another
    connection, another worker): a pick read to the end is ended by its reader, or after the grace."""
    observed, clock = picks()
    read, late, plain = Pick(), Pick(), Pick()
    observed.end(plain, read_to_end=False)
    assert plain.finished == 1  # nobody reads on: the end is the end
    observed.end(read, read_to_end=True)
    observed.end(late, read_to_end=True)
    assert (read.finished, late.finished) == (0, 0)
    read.finish()  # its reader's last chunk came
    clock.t = END_GRACE_S + 0.01
    observed.sweep()
    assert (read.finished, late.finished) == (1, 1)  # the late one ended by the grace, once
    observed.sweep()
    assert late.finished == 1


def test_a_first_observer_may_claim_after_the_timeout_while_its_pick_is_in_flight() -> None:
    """A worker's first observer that stops at the first bytes claims only then (a slow prefill can
    take longer than the attach timeout); once the pick has ended, its entry goes."""
    observed, clock = picks()
    slow, ended = Pick(), Pick()
    slow_token, ended_token = observed.register(slow), observed.register(ended)
    for token in (slow_token, ended_token):
        assert observed.claim(token, END) is not None
    ended.finish()
    clock.t = 12.0
    observed.sweep()
    assert len(observed) == 1  # the slow one's first bytes are still to come; the ended one is gone
    claim = observed.claim(slow_token, FIRST)
    assert claim is not None and claim.pick is slow
    assert len(observed) == 0 and slow.finished == 0
    assert observed.claim(ended_token, FIRST) is None
