"""NVIDIA DCGM exporter metrics, as the reference's ``dcgm-extractor`` reads them: the highest
``DCGM_FI_DEV_GPU_UTIL`` (percent) over the GPUs of the endpoint's pod, as 0..1. A sample with a
``pod`` label counts only for that pod (a DaemonSet exporter lists every pod of its node); one
without counts for every endpoint scraped there (a sidecar)."""

from __future__ import annotations

from epp.signals.promtext import ParseError, ValueRejected, sample_lines, split_sample

GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"


def gpu_utilization(text: str, pod: str) -> float:
    """0..1 for the endpoint's pod (its own name, "" when unknown); ParseError when absent."""
    best: float | None = None
    for line in sample_lines(text, GPU_UTIL):
        _, labels, value = split_sample(line)
        owner = labels.get("pod")
        if pod and owner is not None and owner != pod:
            continue
        if not 0.0 <= value <= 100.0:
            raise ValueRejected(f"{GPU_UTIL} = {value!r} is outside [0, 100]")
        best = value if best is None else max(best, value)
    if best is None:
        raise ParseError(f"{GPU_UTIL} has no sample for pod {pod!r}" if pod else f"no {GPU_UTIL} in the exposition")
    return best / 100.0
