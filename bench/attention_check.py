"""The attention kernels against the XLA reference on the machine this runs on (model.attention's device check).

    python bench/attention_check.py                  # GPU: cudnn vs xla; TPU: splash vs xla (7B shapes)
    python bench/attention_check.py --interpret      # anywhere, small shapes: splash in Pallas's interpreter
                                                     # and cudnn's arguments through JAX's XLA path (a smoke run)

Cases: every mask the model builds (decoder prefill, causal + padding, 28 query heads on 4 KV heads of 128 at
2048 tokens; a decode step against a 2048-slot cache; vision windows of 64 slots, 16 heads of 80; vision full
attention over two images' segments), in each dtype the kernel takes (cudnn: bfloat16, float16; splash:
bfloat16, float32). For each: the relative error (max |diff| / max(1, max |ref|), real query rows only) of the
kernel and of xla in the same dtype against xla in float32 at "highest" precision, for the output and for the
gradients of a weighted sum w.r.t. q, k and v; and the median time of the jitted forward + backward of both.
A kernel passes when its error is at most twice xla's in that dtype (floor 1e-3). Then the errors this
platform gives for the kernels it lacks. One JSON line per result; exit status 1 if a case fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxjax.model.attention import (cache_mask, causal_padding_mask, current_platform,  # noqa: E402
                                   dot_product_attention, fused_attention, key_padding_mask, segment_mask,
                                   select_backend, splash_attention, xla_attention)


def cases(small: bool):
    """(name, q/k/v shapes, AttentionMask) for each mask the model builds."""
    rng = np.random.RandomState(0)
    length, heads, kv_heads, dim = (256, 4, 2, 64) if small else (2048, 28, 4, 128)
    real = np.ones((2, length), bool)
    real[0, :length // 8] = False  # left padding
    real[1, -length // 4:] = False  # right padding
    key_mask = np.zeros((2, length), bool)
    key_mask[:, :length // 2 + 1] = True
    key_mask[0, :3] = False
    # 128 windows of 64 slots: full attention over 8192 vision tokens, whose float32 XLA reference (scores and
    # their gradient, 16 heads) fits an 80 GB GPU; 256 windows needed ~64 GB of temporaries
    windows, slots, vheads, vdim = (8, 64, 2, 80) if small else (128, 64, 16, 80)
    valid = rng.rand(windows, slots) > 0.1
    valid[-1] = False  # a padding window
    segs = np.repeat(np.arange(2), windows * slots // 4)
    segs = np.concatenate([segs, -np.ones(windows * slots // 2, int)])
    return [
        ("decoder prefill", [(2, length, heads, dim), (2, length, kv_heads, dim)],
         causal_padding_mask(jnp.asarray(real))),
        ("decode step", [(2, 1, heads, dim), (2, length, kv_heads, dim)],
         cache_mask(jnp.asarray(key_mask), jnp.int32(length // 2), 1)),
        ("vision windows", [(windows, slots, vheads, vdim)] * 2, key_padding_mask(jnp.asarray(valid))),
        ("vision full attention", [(windows * slots, vheads, vdim)] * 2,
         segment_mask(jnp.asarray(segs), jnp.asarray(segs >= 0))),
    ]


def kernel(backend: str, interpret: bool):
    if not interpret:
        return lambda q, k, v, m: dot_product_attention(q, k, v, dataclasses.replace(m, backend=backend))
    if backend == "splash":
        return lambda q, k, v, m: (splash_attention(q, k, v, m, interpret=True) if m.q_segments is not None
                                   else xla_attention(q, k, v, m.allowed))
    return lambda q, k, v, m: fused_attention(q, k, v, m, implementation="xla")


def outputs_and_grads(fn, q, k, v, mask, weight):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return (out, *vjp(weight.astype(out.dtype)))


def rel_err(a, ref, rows=None) -> float:
    a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
    if rows is not None:
        a, ref = a[rows], ref[rows]
    return float(np.abs(a - ref).max() / max(1.0, np.abs(ref).max()))


def timed(fn, *args, iters=5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(backend: str, dtype, name, shapes, mask, interpret: bool) -> bool:
    rng = np.random.RandomState(1)
    qs, ks = shapes
    q32, k32, v32 = (jnp.asarray(rng.randn(*s), jnp.float32) for s in (qs, ks, ks))
    rows = np.broadcast_to(np.asarray(mask.q_segments) >= 0, qs[:-2]) if mask.q_segments is not None else None
    weight = jnp.asarray(rng.randn(*qs) * (1.0 if rows is None else rows[..., None, None]), jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(outputs_and_grads, static_argnums=0)(kernel("xla", False), q32, k32, v32, mask, weight)
    low = [x.astype(dtype) for x in (q32, k32, v32)]
    run = {b: jax.jit(lambda q, k, v, m, w, b=b: outputs_and_grads(kernel(b, interpret), q, k, v, m, w))
           for b in ("xla", backend)}
    got = {b: f(*low, mask, weight) for b, f in run.items()}
    errs = {b: [rel_err(x, r, rows if i == 0 else None) for i, (x, r) in enumerate(zip(got[b], ref))] for b in got}
    ok = all(e <= max(2 * x, 1e-3) for e, x in zip(errs[backend], errs["xla"]))
    print(json.dumps({"case": name, "backend": backend, "dtype": jnp.dtype(dtype).name, "ok": ok,
                      "rel_err out/dq/dk/dv": [f"{e:.2e}" for e in errs[backend]],
                      "xla rel_err out/dq/dk/dv": [f"{e:.2e}" for e in errs["xla"]],
                      "fwd+bwd s": {b: round(timed(f, *low, mask, weight), 5) for b, f in run.items()}}), flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="small shapes, kernels emulated (any platform)")
    args = parser.parse_args()
    platform = current_platform()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from forward import cpu_model  # bench/forward.py (the host CPU: the timings on a CPU are its)

    print(json.dumps({"platform": platform, "devices": [d.device_kind for d in jax.local_devices()],
                      "host_cpu": cpu_model(), "jax": jax.__version__}), flush=True)
    if args.interpret:
        plan = {"cudnn": (jnp.bfloat16,), "splash": (jnp.bfloat16, jnp.float32)}
    else:
        kernel_here = select_backend("auto", platform, jnp.bfloat16)
        plan = {"cudnn": (jnp.bfloat16, jnp.float16), "splash": (jnp.bfloat16, jnp.float32)}
        plan = {kernel_here: plan[kernel_here]} if kernel_here in plan else {}
    ok = True
    for backend, dtypes in plan.items():
        for dtype in dtypes:
            for name, shapes, mask in cases(small=args.interpret):
                try:  # (one case out of memory, or a kernel the platform refuses, leaves the others)
                    ok &= check(backend, dtype, name, shapes, mask, args.interpret)
                except Exception as err:  # noqa: BLE001
                    ok = False
                    print(json.dumps({"case": name, "backend": backend, "dtype": jnp.dtype(dtype).name, "ok": False,
                                      "error": f"{type(err).__name__}: {str(err)[:400]}"}), flush=True)
    for backend, dtype in (("cudnn", jnp.bfloat16), ("cudnn", jnp.float32), ("splash", jnp.bfloat16)):
        try:
            chosen = select_backend(backend, platform, dtype)
            print(json.dumps({"asked": backend, "dtype": jnp.dtype(dtype).name, "runs": chosen}))
        except ValueError as err:
            print(json.dumps({"asked": backend, "dtype": jnp.dtype(dtype).name, "error": str(err)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
