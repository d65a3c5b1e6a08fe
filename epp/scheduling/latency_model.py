"""Each pod's speed, learned online: TTFT and TPOT as linear functions of what epp knows at pick time.

Features (what a vLLM step costs: a fixed part, the prompt tokens it computes, the sequences it
decodes, and the steps a long prefill needs while they decode):

- TTFT of a request on a pod: ``1``, ``T`` (the prompt tokens the pod has to compute before this
  request's first token: epp's pending prefill tokens there plus this request's uncached part, in
  thousands), ``B`` (the pod's batch: the requests in flight there, in sixteens) and ``T x B``.
- TPOT: ``1``, ``B + 1`` (its batch with this request), and the pending prefill tokens (thousands)
  that its decode steps will share with.

Each pod has one recursive-least-squares fit per quantity, with a forgetting factor (recent
responses count most, so a pod that slows down is relearned within a few hundred responses).
Coefficients are kept non-negative (none of the costs can be negative). A pod seen for the
first time starts from the mean of the pods already trained (a pool's pods are alike until they
show otherwise), or from ``PRIOR`` (an H100 serving an 8B model) when none is. Pure: no clock,
no I/O; the plugin (``epp.scheduling.latency``) measures and feeds it.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

Vector = tuple[float, ...]

TOKEN_UNIT = 1000.0
BATCH_UNIT = 16.0
TRAINED = 20  # observations before a pod's fit counts towards the pool's mean
PRIOR_TTFT: Vector = (0.012, 0.045, 0.004, 0.002)  # seconds: step, per 1k tokens, per 16 in batch, cross
PRIOR_TPOT: Vector = (0.0065, 0.0016, 0.002)  # seconds per token: step, per 16 in batch, per 1k pending
INITIAL_COVARIANCE = 4.0  # how little the prior is trusted (larger: the first observations move it more)
MIN_SECONDS = 0.0005  # no prediction below half a millisecond


def ttft_features(tokens: float, batch: float) -> Vector:
    t, b = tokens / TOKEN_UNIT, batch / BATCH_UNIT
    return (1.0, t, b, t * b)


def tpot_features(batch: float, pending: float) -> Vector:
    return (1.0, (batch + 1) / BATCH_UNIT, pending / TOKEN_UNIT)


def predict(coefficients: tuple[Sequence[float], Sequence[float]], tokens: float, batch: float,
            pending: float) -> tuple[float, float, float]:
    """(TTFT with ``tokens`` to prefill, TPOT, seconds each prompt token adds to the TTFT) at
    ``batch`` and ``pending`` prefill tokens: ``ttft_features`` / ``tpot_features`` dotted with a
    pod's ``coefficients`` (``LatencyModel.coefficients``), without building the features."""
    a, c = coefficients
    tk, bk = tokens / TOKEN_UNIT, batch / BATCH_UNIT
    slope = a[1] + a[3] * bk
    ttft = a[0] + tk * slope + a[2] * bk
    tpot = c[0] + c[1] * (batch + 1) / BATCH_UNIT + c[2] * pending / TOKEN_UNIT
    return (ttft if ttft > MIN_SECONDS else MIN_SECONDS, tpot if tpot > MIN_SECONDS else MIN_SECONDS,
            slope / TOKEN_UNIT)


@dataclass(slots=True)
class Fit:
    """Recursive least squares with forgetting, over a few features."""

    theta: list[float]
    cov: list[list[float]]
    n: int = 0

    @classmethod
    def starting_at(cls, theta: Sequence[float]) -> Fit:
        k = len(theta)
        return cls(list(theta), [[INITIAL_COVARIANCE if i == j else 0.0 for j in range(k)] for i in range(k)])

    def predict(self, x: Vector) -> float:
        value: float = sum(map(operator.mul, self.theta, x))
        return value

    def update(self, x: Vector, y: float, forget: float) -> None:
        cov = self.cov
        px = [sum(map(operator.mul, row, x)) for row in cov]  # P x (P is symmetric)
        denom = forget + sum(map(operator.mul, x, px))
        if denom <= 1e-12:
            return
        err = y - self.predict(x)
        self.theta = [max(0.0, t + p * err / denom) for t, p in zip(self.theta, px, strict=True)]
        # P = (P - P x x'P / denom) / forget; bounded (its trace) so that it cannot wind up while
        # a feature stays constant, scaled as a whole so that it stays positive definite.
        scale = 1.0 / forget
        cov = [[(c - pi * pj / denom) * scale for c, pj in zip(row, px, strict=True)]
               for row, pi in zip(cov, px, strict=True)]
        trace = sum(cov[i][i] for i in range(len(cov)))
        limit = INITIAL_COVARIANCE * 2 * len(cov)
        if trace > limit:
            shrink = limit / trace
            cov = [[c * shrink for c in row] for row in cov]
        self.cov = cov
        self.n += 1


@dataclass(slots=True)
class PodFits:
    ttft: Fit
    tpot: Fit


@dataclass(slots=True)
class LatencyModel:
    """Per-pod fits; ``forget`` is the weight kept by past observations at each new one."""

    forget: float = 0.99
    pods: dict[str, PodFits] = field(default_factory=dict)
    _means: dict[str, Vector] = field(default_factory=dict)  # the pool means, recomputed every few observations
    _observed: int = 0

    def _fits(self, pod: str) -> PodFits:
        fits = self.pods.get(pod)
        if fits is None:
            fits = self.pods[pod] = PodFits(Fit.starting_at(self._mean("ttft")), Fit.starting_at(self._mean("tpot")))
        return fits

    def _theta(self, fit: Fit, which: str) -> list[float] | Vector:
        """A fit's coefficients; the pool's mean while it has observed nothing (a pod nobody has
        tried yet is predicted like the pods that were, so it gets its share and its own fit)."""
        return fit.theta if fit.n else self._mean(which)

    def _mean(self, which: str) -> Vector:
        mean = self._means.get(which)
        if mean is None:
            mean = self._means[which] = self.pool_mean(which)
        return mean

    def _learned(self) -> None:
        self._observed += 1
        if self._observed % 32 == 0 or self._observed <= TRAINED * 4:
            self._means.clear()

    def pool_mean(self, which: str) -> Vector:
        """The mean coefficients of the trained pods (the prior when none is)."""
        fits = [getattr(f, which) for f in self.pods.values() if getattr(f, which).n >= TRAINED]
        if not fits:
            return PRIOR_TTFT if which == "ttft" else PRIOR_TPOT
        k = len(fits[0].theta)
        return tuple(sum(f.theta[i] for f in fits) / len(fits) for i in range(k))

    def coefficients(self, pod: str) -> tuple[Sequence[float], Sequence[float]]:
        """The pod's (TTFT, TPOT) coefficients for ``predict``: its own, or the pool's mean while
        it has observed nothing."""
        fits = self.pods.get(pod) or self._fits(pod)
        return (fits.ttft.theta if fits.ttft.n else self._mean("ttft"),
                fits.tpot.theta if fits.tpot.n else self._mean("tpot"))

    def predict_ttft(self, pod: str, x: Vector) -> float:
        return self._predict(self._fits(pod).ttft, "ttft", x)

    def predict_tpot(self, pod: str, x: Vector) -> float:
        return self._predict(self._fits(pod).tpot, "tpot", x)

    def _predict(self, fit: Fit, which: str, x: Vector) -> float:
        value: float = sum(map(operator.mul, self._theta(fit, which), x))
        return max(MIN_SECONDS, value)

    def observe_ttft(self, pod: str, x: Vector, seconds: float) -> None:
        self._observe(self._fits(pod).ttft, "ttft", x, seconds)

    def observe_tpot(self, pod: str, x: Vector, seconds: float) -> None:
        self._observe(self._fits(pod).tpot, "tpot", x, seconds)

    def _observe(self, fit: Fit, which: str, x: Vector, seconds: float) -> None:
        if not fit.n:  # its first observation: it starts from where the pool is now
            fit.theta = list(self._mean(which))
        fit.update(x, seconds, self.forget)
        self._learned()

    def trained(self, pod: str) -> int:
        fits = self.pods.get(pod)
        return fits.ttft.n if fits is not None else 0

    def forget_pod(self, pod: str) -> None:
        self.pods.pop(pod, None)
        self._means.clear()


ERROR_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class ErrorTracker:
    """How far predicted TTFT was from observed, over the last ``window`` responses: the median of
    |predicted - observed| / observed. Above ``max_error`` predictions are not trusted (the scorers
    fall back); back under ``recover_error`` they are again. Returns a message on each switch."""

    window: int = 200
    min_samples: int = 50
    max_error: float = 0.5
    recover_error: float = 0.35
    trusted: bool = True
    errors: deque[float] = field(default_factory=deque)
    samples: int = 0
    fallbacks: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(ERROR_BUCKETS) + 1))  # all time, per bound
    error_sum: float = 0.0
    _since_check: int = 0

    def add(self, predicted: float, observed: float) -> str | None:
        if observed <= 0:
            return None
        errors = self.errors
        error = abs(predicted - observed) / observed
        errors.append(error)
        self.error_sum += error
        self.buckets[next((i for i, b in enumerate(ERROR_BUCKETS) if error <= b), len(ERROR_BUCKETS))] += 1
        if len(errors) > self.window:
            errors.popleft()
        self.samples += 1
        self._since_check += 1
        if len(errors) < self.min_samples or self._since_check < 16:
            return None
        self._since_check = 0
        median = self.median()
        assert median is not None
        if self.trusted and median > self.max_error:
            self.trusted = False
            self.fallbacks += 1
            return (f"median TTFT prediction error {median:.0%} over the last {len(errors)} responses is above "
                    f"{self.max_error:.0%}: scoring by queue, KV cache and prefix until it is below "
                    f"{self.recover_error:.0%}")
        if not self.trusted and median < self.recover_error:
            self.trusted = True
            return f"median TTFT prediction error back to {median:.0%}: scoring by predicted latency again"
        return None

    def median(self) -> float | None:
        if not self.errors:
            return None
        s = sorted(self.errors)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
