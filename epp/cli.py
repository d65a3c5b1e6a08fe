"""The ``epp`` command: serve | sim | bench | config validate | pick | demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from epp.sim.profiles import PROFILES

    p = sub.add_parser("sim", help="run a simulated vLLM fleet",
                       description="Serve N simulated vLLM servers (OpenAI API, /metrics, KV events).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ports", help="ports, e.g. 8001-8004 or 8001,8002")
    where.add_argument("--count", type=int, help="number of servers (with --base-port)")
    p.add_argument("--base-port", type=int, default=8001)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--profile", default="fast", choices=sorted(PROFILES), help="latency/capacity preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model name served")
    p.add_argument("--served-model-name", nargs="+", help="names the model answers to")
    p.add_argument("--lora-adapters", nargs="+", help="LoRA adapter names served")
    p.add_argument("--max-lora", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--num-gpu-blocks", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--prefill-overhead-ms", type=float)
    p.add_argument("--prefill-per-token-us", type=float)
    p.add_argument("--decode-base-ms", type=float)
    p.add_argument("--decode-per-seq-us", type=float)
    p.add_argument("--default-max-tokens", type=int)
    p.add_argument("--hash-seed", help="emulate PYTHONHASHSEED for the root block hash")
    p.add_argument("--kv-events-config",
                   help="vLLM's JSON; endpoint may use {port}, {port+N}, {index}, e.g. "
                        '\'{"enable_kv_cache_events": true, "publisher": "zmq", '
                        '"endpoint": "tcp://127.0.0.1:{port+1000}", "topic": "kv-events"}\'')
    p.add_argument("--log-level", default="info")


def sim_params(args: argparse.Namespace) -> object:
    from epp.sim.profiles import profile

    def scaled(v: float | None, k: float) -> float | None:
        return None if v is None else v * k

    return profile(args.profile).with_overrides(
        model=args.model,
        served_model_names=tuple(args.served_model_name) if args.served_model_name else None,
        lora_adapters=tuple(args.lora_adapters) if args.lora_adapters else None,
        max_lora=args.max_lora,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False if args.no_prefix_caching else None,
        prefill_overhead_s=scaled(args.prefill_overhead_ms, 1e-3),
        prefill_per_token_s=scaled(args.prefill_per_token_us, 1e-6),
        decode_base_s=scaled(args.decode_base_ms, 1e-3),
        decode_per_seq_s=scaled(args.decode_per_seq_us, 1e-6),
        default_max_tokens=args.default_max_tokens,
        hash_seed=args.hash_seed,
    )


def run_sim(args: argparse.Namespace) -> int:
    from epp.sim.fleet import Fleet, parse_ports, serve_forever
    from epp.sim.kvevents import KVEventsConfig
    from epp.sim.profiles import EngineParams

    try:
        if args.ports:
            ports = parse_ports(args.ports)
        else:
            count = args.count or 4
            ports = list(range(args.base_port, args.base_port + count))
        params = sim_params(args)
        assert isinstance(params, EngineParams)
        kv = KVEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None
    except ValueError as e:
        print(f"epp sim: {e}", file=sys.stderr)
        return 2
    fleet = Fleet(ports, params, host=args.host, seed=args.seed, kv_events=kv)
    _run(serve_forever(fleet))
    return 0


def _run(coro: object) -> None:
    import uvloop

    try:
        uvloop.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epp", description="Endpoint picker for LLM inference gateways.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sim(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "sim":
        return run_sim(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
