"""Make a tiny model offline and record a real vLLM's /metrics and KV events as test fixtures.

Run with the vLLM venv's python (see `make test-vllm`):
    python tests/e2e/vllm_fixture.py --out tests/fixtures/vllm-0.32 --work /tmp/vllm-work
The recording is committed; the default suite compares the simulator against it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model(d: Path) -> None:
    """A random-weight 2-layer Llama with a byte-level BPE tokenizer and a ChatML template."""
    if (d / "config.json").exists():
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "route", "cache", "token", "prefix", "server", "model",
             "system", "user", "assistant", "hello", "world", "shared", "prompt", "block", "queue", "picker"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(d)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
                      eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)


def server_env(work: Path, core: int = 0) -> dict[str, str]:
    """vLLM's environment on these CPU machines (see ../shared/notes/vllm-cpu.md)."""
    return dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1",
                HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CACHE_ROOT=str(work / "cache"), TMPDIR=str(work),
                VLLM_CPU_OMP_THREADS_BIND=str(core))


def server_command(python: str, model: Path, port: int, kv_cfg: dict[str, object],
                   extra: tuple[str, ...] = ()) -> list[str]:
    """A real vLLM OpenAI server with prefix caching, 48 blocks of 32 tokens, KV events and cached_tokens
    (``extra``: more flags, e.g. --enable-scale-out for the render API)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "1024", "--enable-prefix-caching", "--block-size", "32",
            "--num-gpu-blocks-override", "48", "--enable-prompt-tokens-details", "--enforce-eager",
            "--kv-events-config", json.dumps(kv_cfg), *extra]


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"vLLM not healthy after {timeout}s; see {log}")


def post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out: dict[str, object] = json.loads(r.read())
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--work")
    ap.add_argument("--make-model", help="only write the tiny model into this folder")
    args = ap.parse_args()
    if args.make_model:
        make_model(Path(args.make_model))
        return 0
    if not args.out or not args.work:
        ap.error("--out and --work are required to record")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-llama"
    make_model(model)

    import zmq

    http_port, replay_port = free_port(), free_port()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # vLLM binds ipc:// endpoints (and connects tcp://host:port ones). On these machines a PUB that
    # connects to a bound SUB handshakes but delivers nothing (libzmq 4.3.5), so record over ipc.
    kv_endpoint = f"ipc://{work.resolve()}/kv-events.sock"
    sub.connect(kv_endpoint)
    kv_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": kv_endpoint,
              "replay_endpoint": f"tcp://127.0.0.1:{replay_port}", "topic": "kv-events"}
    frames: list[dict[str, object]] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            if sub.poll(200):
                topic, seq, payload = sub.recv_multipart()
                frames.append({"topic": topic.decode(), "seq": int.from_bytes(seq, "big"),
                               "payload_b64": base64.b64encode(payload).decode()})

    threading.Thread(target=receive, daemon=True).start()
    log = open(work / "vllm.log", "w")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(server_command(sys.executable, model, http_port, kv_cfg), env=server_env(work),
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(base, proc, work / "vllm.log")
        shared = " ".join(["shared prefix block alpha beta gamma"] * 20)
        responses = []
        prompts = [shared + " question one", shared + " question two", "unrelated short prompt"]
        for p in prompts:
            tok = post(base + "/tokenize", {"model": "tiny", "prompt": p})
            r = post(base + "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 8, "ignore_eos": True})
            responses.append({"prompt": p, "token_ids": tok["tokens"], "response": r})
        # Distinct long prompts: 48 blocks of 32 tokens fill up, so blocks get evicted (BlockRemoved).
        for k in range(6):
            p = " ".join(f"alpha{k} beta gamma{j % 7}" for j in range(60))
            post(base + "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 40, "ignore_eos": True})
        req = urllib.request.Request(base + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
        post(base + "/v1/completions", {"model": "tiny", "prompt": prompts[0], "max_tokens": 4, "ignore_eos": True})
        chat = post(base + "/v1/chat/completions", {"model": "tiny", "max_tokens": 4, "ignore_eos": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        responses.append({"chat": chat})
        time.sleep(2.0)
        stop.set()
        # Replay from seq 0.
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replay = []
        while dealer.poll(3000):
            parts = dealer.recv_multipart()
            replay.append([base64.b64encode(p).decode() for p in parts])
            if len(parts) >= 2 and parts[1] == (-1).to_bytes(8, "big", signed=True):
                break
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        # What epp scrapes: only the series it reads (prometheus_client's name[] filter).
        names = ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info",
                 "vllm:lora_requests_info"]
        query = "&".join("name%5B%5D=" + urllib.parse.quote(n, safe="") for n in names)
        with urllib.request.urlopen(base + "/metrics?" + query, timeout=10) as r:
            (out / "metrics_filtered.txt").write_text(r.read().decode())
        (out / "metrics.txt").write_text(metrics)
        (out / "kv_events.json").write_text(json.dumps({"frames": frames, "replay": replay}, indent=1))
        (out / "requests.json").write_text(json.dumps({"block_size": 32, "responses": responses}, indent=1))
        import vllm

        (out / "VERSION").write_text(f"vllm {vllm.__version__}\n")
        print(f"recorded {len(frames)} KV event frames, {len(metrics)} bytes of metrics into {out}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
