"""Reward throughput on the CPU: the jitted reward step and the host parsing, 512 completions x 16 boxes.

    python bench/rewards.py [--targets 128 --group 4 --boxes 16 --iters 50]

Times (median over --iters):
  jitted step   rewards.reward_core on prepared device arrays (float64, as score() runs it), after compile
  host parse    parse_completion over all completions (format flags, verdict, boxes, captions, tags)
  host prepare  prepare_batch: the parsing score() does + padding into the bucketed arrays
  score e2e     rewards.score as a user calls it
Targets: jitted step < 5 ms, host parsing < 50 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fxjax import rewards  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import machine_line  # noqa: E402  (bench/forward.py: the CPU model line every figure carries)
from fxjax.rewards.scoring import relax_params  # noqa: E402


def make_batch(n_targets: int, group: int, n_boxes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets, completions = [], []
    for _ in range(n_targets):
        xy = rng.integers(0, 900, (n_boxes, 2))
        wh = rng.integers(10, 300, (n_boxes, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        targets.append({"label": "generated", "boxes": gt.tolist()})
        for _ in range(group):
            pred = gt[rng.permutation(n_boxes)] + rng.integers(-30, 31, gt.shape)
            regions = [(f"artifact {k}: distorted texture near the edge", b) for k, b in enumerate(pred.tolist())]
            text = rewards.render_completion("generated", regions, ["texture quality", "recognizability"],
                                             "The lighting is inconsistent and several regions look synthetic.")
            completions.append(text.replace("<think> ", "<think>", 1))
    return completions, targets


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=128)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--boxes", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    completions, targets = make_batch(args.targets, args.group, args.boxes)
    n = len(completions)
    batch = rewards.prepare_batch(completions, targets)
    weights = rewards.load_stage("alpha").as_array()
    cpu = jax.devices("cpu")[0]
    print(f"jax {jax.__version__}; {machine_line()}; {n} completions "
          f"({args.targets} targets x group {args.group}), {args.boxes} boxes each; padded pred "
          f"{batch['pred'].shape}, gt {batch['gt'].shape}")

    results = {}
    for dtype in ("float64", "float32"):
        with jax.enable_x64(dtype == "float64"):
            cast = [v.astype(dtype) if v.dtype.kind == "f" else v for v in batch.values()]
            args_dev = jax.device_put((*cast, weights.astype(dtype), relax_params("paper", 1.1, 1.1).astype(dtype)), cpu)
            t0 = time.perf_counter()
            jax.block_until_ready(rewards.reward_core(*args_dev))
            compile_ms = 1e3 * (time.perf_counter() - t0)
            step = median_ms(lambda: jax.block_until_ready(rewards.reward_core(*args_dev)), args.iters)
            results[dtype] = step
            print(f"jitted step ({dtype}{', as score() runs it' if dtype == 'float64' else ''}): {step:8.3f} ms"
                  f"   (first call incl. compile {compile_ms:.0f} ms)")

    parse = median_ms(lambda: [rewards.parse_completion(c) for c in completions], max(5, args.iters // 5))
    prepare = median_ms(lambda: rewards.prepare_batch(completions, targets), max(5, args.iters // 5))
    rewards.score(completions, targets)
    e2e = median_ms(lambda: rewards.score(completions, targets), max(5, args.iters // 5))
    print(f"host parse (parse_completion x {n}):        {parse:8.3f} ms")
    print(f"host prepare (parse + pad, as score() does): {prepare:8.3f} ms")
    print(f"score e2e:                                   {e2e:8.3f} ms")
    ok_step, ok_parse = results["float64"] < 5.0, max(parse, prepare) < 50.0
    print(f"targets: jitted step < 5 ms: {'ok' if ok_step else 'MISSED'}; host parsing < 50 ms: "
          f"{'ok' if ok_parse else 'MISSED'}")


if __name__ == "__main__":
    main()
