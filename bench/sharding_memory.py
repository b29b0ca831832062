"""Per-device memory of the base weights, and of the LoRA parameters + optimiser state, under fsdp = N
(fxjax.partition_rules.PARTITION_RULES).

Claims under test: with fsdp = N each device holds about 1/N of the base weights (plus the small
replicated norm scales and row-parallel biases), and about 1/N of the LoRA parameters and their AdamW
moments (the optimiser state takes the parameters' shardings; `lora_state`, by compiled memory analysis).

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
    from fxjax.device_mesh import MeshConfig

    return MeshConfig(data=DEVICES // fsdp, fsdp=fsdp, tensor=1)


def base_bytes(state) -> int:
    import numpy as np
    from flax import nnx

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for _, v in nnx.to_flat_state(state))


def tiny(param_dtype: str = "float32") -> list[dict]:
    """Live and compiled per-device bytes of the tiny preset's base weights for each fsdp."""
    import jax
    from flax import nnx

    from fxjax import device_mesh, partition_rules
    from fxjax.model_init import init_model
    from fxjax.presets import load_preset
    from fxjax.model import Qwen25VL
    from fxjax.model.lora import BASE_PARAMS

    cfg = load_preset("tiny")
    rows = []
    for fsdp in FSDP:
        mesh = device_mesh.make_mesh(_mesh_config(fsdp))
        model = init_model(cfg, param_dtype=param_dtype, mesh=mesh)
        live = partition_rules.device_bytes(model, BASE_PARAMS)
        total = base_bytes(nnx.state(model, BASE_PARAMS))

        def build():
            return Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)

        graphdef, abstract = nnx.split(nnx.eval_shape(build))
        compiled = jax.jit(lambda: nnx.split(build())[1],
                           out_shardings=partition_rules.param_shardings(abstract, mesh)).lower().compile()
        rows.append(dict(config="tiny", dtype=param_dtype, fsdp=fsdp, mesh=_mesh_config(fsdp).shape, total=total,
                         live_max=max(live.values()), live_min=min(live.values()),
                         compiled=int(compiled.memory_analysis().output_size_in_bytes),
                         abstract=partition_rules.shard_bytes(abstract, mesh, BASE_PARAMS),
                         replicated_dims=len(partition_rules.replicated_dims(abstract, mesh))))
        del model
    return rows


def abstract(preset: str = "7b", param_dtype: str = "bfloat16", compile_it: bool = False) -> list[dict]:
    """Per-device bytes of a big config's base weights from shapes alone (and, optionally, compiled)."""
    import jax
    from flax import nnx

    from fxjax import device_mesh, partition_rules
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
                   abstract=partition_rules.shard_bytes(state, sizes, BASE_PARAMS),
                   replicated_dims=[tuple(d) for d in partition_rules.replicated_dims(state, sizes)])
        if compile_it:
            t = time.time()
            mesh = device_mesh.make_mesh(sizes)
            compiled = jax.jit(lambda: nnx.split(build())[1],
                               out_shardings=partition_rules.param_shardings(state, mesh)).lower().compile()
            row["compiled"] = int(compiled.memory_analysis().output_size_in_bytes)
            row["compile_seconds"] = round(time.time() - t, 1)
        rows.append(row)
    # what a full (fsdp x tensor) mesh would leave replicated for lack of divisibility
    wide = device_mesh.MeshConfig(1, 8, 8)
    rows.append(dict(config=preset, dtype=param_dtype, fsdp=8, tensor=8, mesh=wide.shape, total=total,
                     abstract=partition_rules.shard_bytes(state, wide, BASE_PARAMS),
                     replicated_dims=[tuple(d) for d in partition_rules.replicated_dims(state, wide)]))
    return rows


def lora_state(preset: str = "7b", rank: int = 32, param_dtype: str = "bfloat16") -> list[dict]:
    """Per-device bytes of the LoRA parameters + their optimiser state (the run's: clipping + AdamW, state
    shardings from fxjax.train.run_setup.opt_state_shardings) under fsdp = 1, 2, 4, 8, by compiled memory
    analysis: the state's init compiled with its shardings as out_shardings (shapes only, nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fxjax import device_mesh, partition_rules
    from fxjax.model import Qwen25VL
    from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora
    from fxjax.presets import load_preset
    from fxjax.train.optimizer import make_optimizer
    from fxjax.train.run_setup import opt_state_shardings
    from fxjax.config_sections import OptimSection

    cfg = load_preset(preset)

    def build():
        model = Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)
        apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules="all-linear"), rngs=nnx.Rngs(1))
        return model

    params = nnx.state(nnx.eval_shape(build), LORA_PARAMS)
    tx, _ = make_optimizer(OptimSection(), 1000)

    def init():
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
        return zeros, tx.init(zeros)

    abstract = jax.eval_shape(init)
    total = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    n_lora = sum(int(x.size) for x in jax.tree.leaves(params))
    rows = []
    for fsdp in FSDP:
        mesh = device_mesh.make_mesh(_mesh_config(fsdp))
        params_sh = partition_rules.param_shardings(params, mesh)
        opt_sh = opt_state_shardings(tx, params, params_sh, NamedSharding(mesh, P()))
        compiled = jax.jit(init, out_shardings=(params_sh, opt_sh)).lower().compile()
        rows.append(dict(config=preset, rank=rank, fsdp=fsdp, mesh=_mesh_config(fsdp).shape, lora_params=n_lora,
                         total=total, compiled=int(compiled.memory_analysis().output_size_in_bytes)))
    return rows


def lora_table(rows: list[dict]) -> str:
    lines = [f"{'config':6} {'rank':>4} {'LoRA params':>12} {'mesh (d,f,t)':13} {'LoRA+opt total':>15} "
             f"{'per device':>11} {'x total':>8} {'1/fsdp':>8}"]
    for r in rows:
        lines.append(f"{r['config']:6} {r['rank']:>4} {r['lora_params']:>12,} {str(tuple(r['mesh'])):13} "
                     f"{_fmt(r['total']):>15} {_fmt(r['compiled']):>11} {r['compiled'] / r['total']:8.4f} "
                     f"{1 / r['fsdp']:8.4f}")
    return "\n".join(lines)


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
    parser.add_argument("--lora-preset", default="7b", help="config of the LoRA + optimiser-state table")
    parser.add_argument("--lora-rank", type=int, default=32)
    args = parser.parse_args(argv)
    _setup()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from forward import machine_line  # bench/forward.py: the CPU line every figure carries

    print(machine_line())
    rows = tiny()
    if not args.tiny_only:
        rows += abstract("7b", compile_it=args.compile_7b)
    print(table(rows))
    lora_rows = lora_state(args.lora_preset, args.lora_rank)
    print(f"\nLoRA parameters (float32) + optimiser state (clipping + AdamW: mu, nu), per device by compiled "
          f"memory analysis ({args.lora_preset}, all-linear LoRA r={args.lora_rank}):")
    print(lora_table(lora_rows))
    worst = max(r["compiled"] * r["fsdp"] / r["total"] for r in lora_rows)
    print(f"per device x fsdp / total <= {worst:.3f}: LoRA + optimiser state falls ~1/fsdp")
    for r in rows:
        if isinstance(r["replicated_dims"], list) and r["replicated_dims"]:
            shown = ", ".join(f"{d[0]}[{d[1]}]={d[2]} (axes {'x'.join(d[3])}={d[4]})" for d in r["replicated_dims"][:4])
            print(f"{r['config']} mesh {tuple(r['mesh'])}: {len(r['replicated_dims'])} dims replicated, e.g. {shown}")
    if args.json:
        args.json.write_text(json.dumps(rows + lora_rows, indent=1, default=str))


if __name__ == "__main__":
    main()
