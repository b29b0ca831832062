"""bench/plan.py's smallest case through its real entry point: the tiny preset's decode step compiled from
shapes alone on a 2-device fsdp mesh, in a subprocess (the simulated device count is fixed at start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _tiny_base_bytes(dtype: str) -> int:
    """Bytes of the tiny preset's base weights, unsharded (shapes only)."""
    from flax import nnx

    from fxjax.model import Qwen25VL
    from fxjax.presets import load_preset

    model = nnx.eval_shape(lambda: Qwen25VL(load_preset("tiny"), rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for _, v in nnx.to_flat_state(nnx.state(model)))


def test_plan_tiny_decode_on_two_devices(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "plan.py"), "--presets", "tiny", "--programs", "decode",
           "--mesh", "1,2,1", "--batch", "2", "--image-tokens", "16", "--prompt-len", "64", "--completion-len", "16",
           "--json", str(rows_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 simulated CPU devices" in out and "jax " in out and "CPU:" in out
    assert "compile s" in out  # the table's header
    table_rows = [line for line in out.splitlines() if line.startswith("tiny ")]
    assert len(table_rows) == 1 and "decode" in table_rows[0], out

    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert (row["preset"], row["program"], row["mesh"]) == ("tiny", "decode", [1, 2, 1])
    for key in ("argument", "output", "temp", "total"):
        assert row[key] > 0, row
    assert row["total"] == row["argument"] + row["output"] - row["alias"] + row["temp"]
    assert row["compile_s"] >= 0 and row["lower_s"] >= 0
    # fsdp 2: each device holds about half of the bf16 base weights (the 151,936 x 64 embedding dominates);
    # the LoRA factors, the KV cache and the replicated norms add little.
    whole = _tiny_base_bytes("bfloat16")
    assert 0.45 * whole < row["argument"] < 0.75 * whole, (row["argument"], whole)


def test_plan_rollout_gathers_weights_per_token_only_when_they_stay_split(tmp_path):
    """The whole sampler (`rollout`, as GRPO runs it) with the decoder layers under scan on fsdp 2: as
    placed, each generated token all-gathers the layers' weight shards again inside the decode loop; with
    the weights gathered first (`rollout-gathered`, fxjax.decode_weights) what is left per token is a few KiB
    of the sampler's own activations (the top-k over the batch)."""
    rows_file = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "plan.py"), "--presets", "tiny", "--programs", "rollout,rollout-gathered",
           "--mesh", "1,2,1", "--batch", "4", "--num-generations", "2", "--image-tokens", "4", "--prompt-len", "32",
           "--completion-len", "4", "--scan-layers", "--json", str(rows_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed, gathered = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert (placed["program"], gathered["program"]) == ("rollout", "rollout-gathered")
    assert "each generated token: " in proc.stdout
    # (533 KiB a token here: the other device's half of the layers' bf16 weights and float32 LoRA r32 factors)
    assert placed["token_all_gathers"] > 10 and placed["token_all_gather_bytes"] > 256 * 1024, placed
    assert gathered["token_all_gather_bytes"] * 20 < placed["token_all_gather_bytes"], gathered
    assert gathered["argument"] > placed["argument"]  # the gathered copy is what each device holds instead
