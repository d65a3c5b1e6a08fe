"""`epp bench pd`: prefill/decode disaggregation against the same GPUs aggregated, in one run.

One seeded long-prompt trace (``long_tokens`` prompts, ``output_tokens`` out, streamed), driven
open-loop at a fraction of the aggregated fleet's no-affinity capacity through Envoy + epp twice:
- aggregated: N pods, each prefilling and decoding, epp's default profile;
- P/D: the same N pods, the first ``prefill`` of them labelled ``llm-d.ai/role: prefill`` and the
  others ``decode`` (epp's endpoints file carries the labels), with the reference's P/D config
  (``epp/bench/profiles/pd.yaml``): the decode pod has the prefill pod epp names compute the
  prompt and receives its KV blocks (``kv_bytes_per_token`` / ``kv_transfer_gbytes_per_s``).
TTFT and inter-token latency percentiles, throughput, and the share of requests disaggregated.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from epp.bench.routing import Running, capacity, drive, epp_behind_envoy, split_cores, summarize
from epp.bench.workloads import Trace, WorkloadParams, build
from epp.sim.fleet import Fleet
from epp.sim.profiles import fleet_params
from epp.stack.local import endpoints_yaml, free_ports

PD_CONFIG = Path(__file__).resolve().parent / "profiles" / "pd.yaml"


@dataclass
class PDOptions:
    preset: str = "h100-llama8b"
    servers: int = 8
    prefill: int = 4  # of them, prefill pods in the P/D run
    load: float = 0.6
    requests: int = 300
    seed: int = 1
    capacity_rps: float | None = None
    capacity_seconds: float = 20.0
    max_seconds: float = 300.0
    params: WorkloadParams = field(default_factory=lambda: WorkloadParams(long_tokens=8000, long_share=1.0,
                                                                          output_tokens=256))


async def _run(name: str, opts: PDOptions, trace: Trace, out: Path, router_cores: set[int] | None,
               roles: bool) -> dict[str, Any]:
    per_server = fleet_params(opts.preset, opts.servers)
    fleet = Fleet(free_ports(len(per_server)), per_server)
    await fleet.start()
    work = out / "logs" / name
    work.mkdir(parents=True, exist_ok=True)
    try:
        addresses = [s.address for s in fleet.servers]
        extra: tuple[str, ...] = ()
        endpoints_file = None
        if roles:
            labels = [{"llm-d.ai/role": "prefill" if i < opts.prefill else "decode"} for i in range(len(addresses))]
            endpoints_file = work / "endpoints.yaml"
            endpoints_file.write_text(endpoints_yaml(addresses, labels))
            extra = ("--config-file", str(PD_CONFIG))
        running: Running = await epp_behind_envoy(addresses, work, extra, endpoints_file=endpoints_file)
        try:
            running.isolate(router_cores)
            cpu0 = running.cpu()
            results, elapsed, _ = await drive(running.url, trace, fleet, opts.max_seconds)
            row = summarize(name, opts.load, results, elapsed, fleet, running.cpu() - cpu0)
            (work / "requests.json").write_text(json.dumps([asdict(r) for r in results]))
        finally:
            running.stop()
        itl = sorted(x for r in results if r.status == 200 for x in r.itl_s)
        row["itl_p99_ms"] = round(1000 * itl[min(len(itl) - 1, int(0.99 * len(itl)))], 2) if itl else None
        row["remote_prefills"] = sum(s.engine.stats.remote_prefills for s in fleet.servers)
        row["prompt_tokens_mean"] = round(sum(r.prompt_tokens for r in results) / max(1, len(results)))
        return row
    finally:
        await fleet.stop()


async def bench_pd(out: Path, opts: PDOptions) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    _, router_cores = split_cores()
    cap = opts.capacity_rps or await capacity(opts.preset, opts.servers, "long", opts.params, opts.capacity_seconds,
                                              affinity=False)
    trace = build("long", opts.requests, cap * opts.load, opts.seed, opts.params)
    trace.save(out / "trace-long.json")
    rows = [await _run("aggregated", opts, trace, out, router_cores, roles=False),
            await _run("pd", opts, trace, out, router_cores, roles=True)]
    agg, pd = rows
    ratios = {k: round(pd[k] / agg[k], 2) if agg.get(k) else None
              for k in ("ttft_p50_s", "ttft_p90_s", "itl_p50_ms", "itl_p90_ms", "e2e_p90_s", "output_tok_per_s")}
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "preset": opts.preset, "servers": opts.servers,
                       "prefill_pods": opts.prefill, "load": opts.load, "capacity_rps": round(cap, 2),
                       "requests": opts.requests, "params": asdict(opts.params)},
              "rows": rows, "pd_over_aggregated": ratios}
    (out / "pd.json").write_text(json.dumps(result, indent=1))
    (out / "pd.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# epp bench pd ({m['date']}): {m['preset']} x {m['servers']} ({m['prefill_pods']} prefill in the P/D "
             f"run), load {m['load']} of {m['capacity_rps']} req/s (aggregated, no affinity), {m['requests']} "
             f"requests of ~{result['rows'][0]['prompt_tokens_mean']} prompt tokens and "
             f"{m['params']['output_tokens']} out", "",
             "| run | req/s | output tok/s | TTFT p50 s | TTFT p90 s | TTFT p99 s | ITL p50 ms | ITL p90 ms "
             "| ITL p99 ms | e2e p90 s | disaggregated | errors | sim late ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['contender']} | {r['req_per_s']} | {r['output_tok_per_s']} | {r['ttft_p50_s']} "
                     f"| {r['ttft_p90_s']} | {r['ttft_p99_s']} | {r['itl_p50_ms']} | {r['itl_p90_ms']} "
                     f"| {r['itl_p99_ms']} | {r['e2e_p90_s']} | {r['remote_prefills']} | {r['errors']} "
                     f"| {r['sim_step_late_ms']} |")
    ratios = result["pd_over_aggregated"]
    lines += ["", "P/D / aggregated: " + ", ".join(f"{k} {v}x" for k, v in ratios.items())]
    return "\n".join(lines) + "\n"
