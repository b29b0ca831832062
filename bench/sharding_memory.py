"""Per-device memory of the base weights under fsdp = N (fxjax.sharding.PARTITION_RULES).

Claim under test: with fsdp = N each device holds about 1/N of the base weights (plus the small
replicated norm scales and row-parallel biases).

Three independent measurements, on simulated CPU devices (no accelerator needed):

  live      the tiny preset initialised on its shards (fxjax.model_init.init_model(..., mesh=)), bytes
            of the addressable shards on each device (live buffer accounting);
  compiled  the same init compiled with the rules as out_shardings:
            jit(...).lower().compile().memory_analysis().output_size_in_bytes (per device);
  abstract  a 7B-shaped config from shapes alone (nnx.eval_shape + the rules -> per-device shard shapes
            -> bytes); no weights are allocated, so any size works on a laptop.

    python bench/sharding_memory.py                 # tiny (live + compiled) and 7b (abstract), fsdp 1/2/4/8
    python bench/sharding_memory.py --compile-7b    # also compile the sharded 7B init (~1.5 min per mesh, ~6 min on 2 cores)
    python bench/sharding_memory.py --json out.json # machine-readable results too
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICES = 8
FSDP = (1, 2, 4, 8)


def _setup() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    import jax

    jax.config.update("jax_num_cpu_devices", DEVICES)


def _mesh_config(fsdp: int):
    from fxjax.sharding import MeshConfig

    return MeshConfig(data=DEVICES // fsdp, fsdp=fsdp, tensor=1)


def base_bytes(state) -> int:
    import numpy as np
    from flax import nnx

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for _, v in nnx.to_flat_state(state))


def tiny(param_dtype: str = "float32") -> list[dict]:
    """Live and compiled per-device bytes of the tiny preset's base weights for each fsdp."""
    import jax
    from flax import nnx

    from fxjax import sharding
    from fxjax.model_init import init_model
    from fxjax.presets import load_preset
    from fxjax.model import Qwen25VL
    from fxjax.model.lora import BASE_PARAMS

    cfg = load_preset("tiny")
    rows = []
    for fsdp in FSDP:
        mesh = sharding.make_mesh(_mesh_config(fsdp))
        model = init_model(cfg, param_dtype=param_dtype, mesh=mesh)
        live = sharding.device_bytes(model, BASE_PARAMS)
        total = base_bytes(nnx.state(model, BASE_PARAMS))

        def build():
            return Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)

        graphdef, abstract = nnx.split(nnx.eval_shape(build))
        compiled = jax.jit(lambda: nnx.split(build())[1],
                           out_shardings=sharding.param_shardings(abstract, mesh)).lower().compile()
        rows.append(dict(config="tiny", dtype=param_dtype, fsdp=fsdp, mesh=_mesh_config(fsdp).shape, total=total,
                         live_max=max(live.values()), live_min=min(live.values()),
                         compiled=int(compiled.memory_analysis().output_size_in_bytes),
                         abstract=sharding.shard_bytes(abstract, mesh, BASE_PARAMS),
                         replicated_dims=len(sharding.replicated_dims(abstract, mesh))))
        del model
    return rows


def abstract(preset: str = "7b", param_dtype: str = "bfloat16", compile_it: bool = False) -> list[dict]:
    """Per-device bytes of a big config's base weights from shapes alone (and, optionally, compiled)."""
    import jax
    from flax import nnx

    from fxjax import sharding
    from fxjax.presets import load_preset
    from fxjax.model import Qwen25VL
    from fxjax.model.lora import BASE_PARAMS

    cfg = load_preset(preset)

    def build():
        return Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    total = base_bytes(nnx.state(nnx.merge(graphdef, state), BASE_PARAMS))
    rows = []
    for fsdp in FSDP:
        sizes = _mesh_config(fsdp)
        row = dict(config=preset, dtype=param_dtype, fsdp=fsdp, mesh=sizes.shape, total=total,
                   abstract=sharding.shard_bytes(state, sizes, BASE_PARAMS),
                   replicated_dims=[tuple(d) for d in sharding.replicated_dims(state, sizes)])
        if compile_it:
            t = time.time()
            mesh = sharding.make_mesh(sizes)
            compiled = jax.jit(lambda: nnx.split(build())[1],
                               out_shardings=sharding.param_shardings(state, mesh)).lower().compile()
            row["compiled"] = int(compiled.memory_analysis().output_size_in_bytes)
            row["compile_seconds"] = round(time.time() - t, 1)
        rows.append(row)
    # what a full (fsdp x tensor) mesh would leave replicated for lack of divisibility
    wide = sharding.MeshConfig(1, 8, 8)
    rows.append(dict(config=preset, dtype=param_dtype, fsdp=8, tensor=8, mesh=wide.shape, total=total,
                     abstract=sharding.shard_bytes(state, wide, BASE_PARAMS),
                     replicated_dims=[tuple(d) for d in sharding.replicated_dims(state, wide)]))
    return rows


def _fmt(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table(rows: list[dict]) -> str:
    lines = [f"{'config':6} {'dtype':8} {'mesh (d,f,t)':13} {'total':>11} {'per device':>11} {'x total':>8} "
             f"{'1/(f*t)':>8} {'live max':>11} {'compiled':>11} replicated dims"]
    for r in rows:
        per = r.get("live_max", r["abstract"])
        shards = r["mesh"][1] * r["mesh"][2]
        rep = r["replicated_dims"] if isinstance(r["replicated_dims"], int) else len(r["replicated_dims"])
        lines.append(f"{r['config']:6} {r['dtype']:8} {str(tuple(r['mesh'])):13} {_fmt(r['total']):>11} "
                     f"{_fmt(r['abstract']):>11} {per / r['total']:8.4f} {1 / shards:8.4f} "
                     f"{_fmt(r['live_max']) if 'live_max' in r else '-':>11} "
                     f"{_fmt(r['compiled']) if 'compiled' in r else '-':>11} {rep}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--tiny-only", action="store_true", help="skip the 7B table")
    parser.add_argument("--compile-7b", action="store_true", help="also compile the sharded 7B init")
    args = parser.parse_args(argv)
    _setup()
    rows = tiny()
    if not args.tiny_only:
        rows += abstract("7b", compile_it=args.compile_7b)
    print(table(rows))
    for r in rows:
        if isinstance(r["replicated_dims"], list) and r["replicated_dims"]:
            shown = ", ".join(f"{d[0]}[{d[1]}]={d[2]} (axes {'x'.join(d[3])}={d[4]})" for d in r["replicated_dims"][:4])
            print(f"{r['config']} mesh {tuple(r['mesh'])}: {len(r['replicated_dims'])} dims replicated, e.g. {shown}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
