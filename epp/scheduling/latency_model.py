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
Coefficients are kept non-negative (none of the costs can be negative) by a projected step. A
pod seen for the first time starts from the mean of the pods already trained (a pool's pods are
alike until they show otherwise), or from ``PRIOR`` (an H100 serving an 8B model) when none is.
Beside them one shared fit of the pool's cost shape learns from every pod, with a speed factor
per pod (``LatencyModel.shared``). Pure: no clock, no I/O; the plugin
(``epp.scheduling.latency``) measures and feeds it.
"""

from __future__ import annotations

import math
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
MIN_FACTOR = 0.01  # no pod is taken for more than 100 times faster than the pool's shared fit


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
        step = [t + p * err / denom for t, p in zip(self.theta, px, strict=True)]
        if min(step) < 0:
            step = self._projected(x, y, forget, [i for i, v in enumerate(step) if v >= 0])
        self.theta = step
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

    def _projected(self, x: Vector, y: float, forget: float, free: list[int]) -> list[float]:
        """The update with the coefficients it would drive negative held at 0 and the ``free``
        others fitted without them (clamping the unconstrained step instead moves the prediction
        away from the observation whenever two features are correlated, and the fit runs off)."""
        theta, cov, k = self.theta, self.cov, len(self.theta)
        while free:
            px = [sum(cov[i][j] * x[j] for j in free) for i in free]
            denom = forget + sum(x[i] * p for i, p in zip(free, px, strict=True))
            err = y - sum(theta[i] * x[i] for i in free)
            step = [0.0] * k
            for i, p in zip(free, px, strict=True):
                step[i] = theta[i] + p * err / denom
            if all(step[i] >= 0 for i in free):
                return step
            free = [i for i in free if step[i] >= 0]
        return list(theta)  # every coefficient would go negative: the fit keeps where it was


@dataclass(slots=True)
class PodFits:
    ttft: Fit
    tpot: Fit


@dataclass(slots=True)
class Speed:
    """How many times slower than the pool's shared fit one pod answers: least squares of
    ``observed ~ speed x shared prediction`` with forgetting (1.0 until it has observed)."""

    weighted: float = 0.0  # sum of observed x predicted, forgotten
    norm: float = 0.0  # sum of predicted squared, forgotten
    n: int = 0

    @property
    def factor(self) -> float:
        return max(MIN_FACTOR, self.weighted / self.norm) if self.norm > 1e-18 else 1.0

    def update(self, predicted: float, observed: float, forget: float) -> None:
        self.weighted = self.weighted * forget + observed * predicted
        self.norm = self.norm * forget + predicted * predicted
        self.n += 1

    def rescale(self, by: float) -> None:
        self.weighted /= by


@dataclass(slots=True)
class PodSpeeds:
    ttft: Speed = field(default_factory=Speed)
    tpot: Speed = field(default_factory=Speed)


@dataclass(slots=True)
class LatencyModel:
    """Each pod's (TTFT, TPOT) coefficients; ``forget`` is the weight kept by past observations at
    each new one (per pod).

    ``shared`` (the producer's ``podModel: speed``): one fit of the pool's cost shape over every
    pod's responses, and per pod one speed factor, so a pod's coefficients are its factor x the
    shared ones. Pods alike are then predicted alike (a per-pod fit of four collinear features
    puts the same cost on the batch term for one pod and on the token term for the next, and
    predicts the same request several times apart), and a slower generation is still told apart
    by its factor. Without it (``podModel: own``) each pod has its own fit of every coefficient."""

    forget: float = 0.99
    shared: bool = False
    pods: dict[str, PodFits] = field(default_factory=dict)
    speeds: dict[str, PodSpeeds] = field(default_factory=dict)
    pool_ttft: Fit = field(default_factory=lambda: Fit.starting_at(PRIOR_TTFT))
    pool_tpot: Fit = field(default_factory=lambda: Fit.starting_at(PRIOR_TPOT))
    _means: dict[str, Vector] = field(default_factory=dict)  # the pool means, recomputed every few observations
    _scaled: dict[str, tuple[Vector, Vector]] = field(default_factory=dict)  # shared mode: factor x pool fit
    # ``coefficients`` of each pod until it observes (own mode), and the pods whose entry is the
    # pool's mean (dropped when the mean moves).
    known: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    _known_on_mean: set[str] = field(default_factory=set)
    _observed: int = 0
    _shared_observed: int = 0

    # -- reading ------------------------------------------------------------------------------------
    def coefficients(self, pod: str) -> tuple[Sequence[float], Sequence[float]]:
        """The pod's (TTFT, TPOT) coefficients for ``predict``: its factor x the shared fit, or its
        own fit (the pool's mean while it has observed nothing)."""
        if self.shared:
            return self.speed_coefficients(pod)
        known = self.known.get(pod)
        if known is None:
            fits = self.pods.get(pod) or self._fits(pod)
            known = self.known[pod] = (fits.ttft.theta if fits.ttft.n else self._mean("ttft"),
                                       fits.tpot.theta if fits.tpot.n else self._mean("tpot"))
            if not fits.ttft.n or not fits.tpot.n:
                self._known_on_mean.add(pod)
        return known

    def speed_coefficients(self, pod: str) -> tuple[Vector, Vector]:
        """The pod's speed factors x the shared fit (the factors are kept in both modes): how fast
        the pod is on the same work as every other pod. Built once per pod until the next
        observation; ``podModel: speed`` predicts with it."""
        scaled = self._scaled.get(pod)
        if scaled is None:
            speeds = self.speeds.get(pod)
            st, sp = (speeds.ttft.factor, speeds.tpot.factor) if speeds is not None else (1.0, 1.0)
            scaled = self._scaled[pod] = (tuple(st * v for v in self.pool_ttft.theta),
                                          tuple(sp * v for v in self.pool_tpot.theta))
        return scaled

    def ttft_factor(self, pod: str) -> float:
        """How many times the shared fit's TTFT the pod takes (1.0 before it has observed): a
        pod's ``speed_coefficients`` are this factor x ``pool_ttft``, without building them."""
        speeds = self.speeds.get(pod)
        return speeds.ttft.factor if speeds is not None else 1.0

    def predict_ttft(self, pod: str, x: Vector) -> float:
        value: float = sum(map(operator.mul, self.coefficients(pod)[0], x))
        return max(MIN_SECONDS, value)

    def predict_tpot(self, pod: str, x: Vector) -> float:
        value: float = sum(map(operator.mul, self.coefficients(pod)[1], x))
        return max(MIN_SECONDS, value)

    def trained(self, pod: str) -> int:
        if self.shared:
            speeds = self.speeds.get(pod)
            return speeds.ttft.n if speeds is not None else 0
        fits = self.pods.get(pod)
        return fits.ttft.n if fits is not None else 0

    def pool_mean(self, which: str) -> Vector:
        """The shared fit, or the mean coefficients of the trained pods (the prior when none is)."""
        if self.shared:
            return tuple(self.pool_ttft.theta if which == "ttft" else self.pool_tpot.theta)
        fits = [getattr(f, which) for f in self.pods.values() if getattr(f, which).n >= TRAINED]
        if not fits:
            return PRIOR_TTFT if which == "ttft" else PRIOR_TPOT
        k = len(fits[0].theta)
        return tuple(sum(f.theta[i] for f in fits) / len(fits) for i in range(k))

    def speed_factors(self) -> dict[str, tuple[float, float]]:
        """Each pod's (TTFT, TPOT) factor on the shared fit."""
        return {pod: (s.ttft.factor, s.tpot.factor) for pod, s in self.speeds.items()}

    def known_pods(self) -> list[str]:
        return list(self.speeds if self.shared else self.pods)

    # -- learning -----------------------------------------------------------------------------------
    def observe_ttft(self, pod: str, x: Vector, seconds: float) -> None:
        self._observe_shared(pod, "ttft", x, seconds)
        if not self.shared:
            self._observe(self._fits(pod).ttft, "ttft", x, seconds)
            self.known.pop(pod, None)

    def observe_tpot(self, pod: str, x: Vector, seconds: float) -> None:
        self._observe_shared(pod, "tpot", x, seconds)
        if not self.shared:
            self._observe(self._fits(pod).tpot, "tpot", x, seconds)
            self.known.pop(pod, None)

    def forget_pod(self, pod: str) -> None:
        self.pods.pop(pod, None)
        self.speeds.pop(pod, None)
        self._scaled.pop(pod, None)
        self.known.pop(pod, None)
        self._forget_means()

    def _observe_shared(self, pod: str, which: str, x: Vector, seconds: float) -> None:
        speeds = self.speeds.get(pod)
        if speeds is None:
            speeds = self.speeds[pod] = PodSpeeds()
        speed, fit = (speeds.ttft, self.pool_ttft) if which == "ttft" else (speeds.tpot, self.pool_tpot)
        shared = max(MIN_SECONDS, fit.predict(x))
        factor = speed.factor
        speed.update(shared, seconds, self.forget)
        # The shared fit sees every pod's responses: it forgets per pool-wide observation what a
        # pod's own fit would per its own, and learns the shape in the pool's units (seconds / factor).
        fit.update(x, seconds / factor, self.forget ** (1.0 / max(1, len(self.speeds))))
        self._scaled.clear()
        self._shared_observed += 1
        if self._shared_observed % 32 == 0:
            self._renormalise(which)

    def _renormalise(self, which: str) -> None:
        """Keep the trained pods' factors at a geometric mean of 1, moving the scale into the
        shared fit (predictions unchanged), so that a new pod starting at 1 starts at the pool's
        typical speed and the factors cannot drift off with the fit."""
        speeds = [getattr(s, which) for s in self.speeds.values() if getattr(s, which).n >= TRAINED]
        if not speeds:
            return
        g = math.exp(sum(math.log(max(1e-6, s.factor)) for s in speeds) / len(speeds))
        if abs(g - 1.0) < 0.01:
            return
        for s in self.speeds.values():
            getattr(s, which).rescale(g)
        fit = self.pool_ttft if which == "ttft" else self.pool_tpot
        fit.theta = [v * g for v in fit.theta]
        self._scaled.clear()

    def _fits(self, pod: str) -> PodFits:
        fits = self.pods.get(pod)
        if fits is None:
            fits = self.pods[pod] = PodFits(Fit.starting_at(self._mean("ttft")), Fit.starting_at(self._mean("tpot")))
        return fits

    def _mean(self, which: str) -> Vector:
        mean = self._means.get(which)
        if mean is None:
            mean = self._means[which] = self.pool_mean(which)
        return mean

    def _observe(self, fit: Fit, which: str, x: Vector, seconds: float) -> None:
        if not fit.n:  # its first observation: it starts from where the pool is now
            fit.theta = list(self._mean(which))
        fit.update(x, seconds, self.forget)
        self._observed += 1
        if self._observed % 32 == 0 or self._observed <= TRAINED * 4:
            self._forget_means()

    def _forget_means(self) -> None:
        self._means.clear()
        for pod in self._known_on_mean:
            self.known.pop(pod, None)
        self._known_on_mean.clear()


ERROR_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)


def bucket_median(cumulative: Sequence[tuple[float, float]]) -> float | None:
    """The median of a histogram given as (upper bound, cumulative count) pairs, the last bound
    infinite: interpolated within its bucket (the last finite bound when it falls past it)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    half = cumulative[-1][1] / 2
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= half:
            if bound == math.inf:
                return lo_bound
            share = (half - lo_count) / (count - lo_count) if count > lo_count else 0.0
            return round(lo_bound + share * (bound - lo_bound), 3)
        lo_bound, lo_count = bound, count
    return None


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

    def cumulative(self) -> list[tuple[float, float]]:
        """The all-time error histogram as (upper bound, cumulative count) pairs."""
        running, out = 0, []
        for bound, n in zip((*ERROR_BUCKETS, math.inf), self.buckets, strict=True):
            running += n
            out.append((bound, float(running)))
        return out

    def overall_median(self) -> float | None:
        """The median error over every response so far (from the histogram)."""
        return bucket_median(self.cumulative())

    def median(self) -> float | None:
        if not self.errors:
            return None
        s = sorted(self.errors)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
