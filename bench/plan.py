"""Compile and memory plan: the real programs of fxjax at the real model sizes, compiled from shapes alone.

For each preset (3b, 7b, 32b, 72b; tiny for smoke runs) and each program

  sft      the jitted LoRA SFT step (train.step.make_train_step: forward, backward, clipping + AdamW),
  grpo     the jitted GRPO update (train.grpo_step.make_grpo_step) on P prompts x G completions, as G full
           sequences per prompt (grpo.share_prompts false; the default runs each prompt once, fewer tokens),
  prefill  the sampler's prefill (model.generate.prefill: vision encoder + prompt into a fresh KV cache),
  decode   one decode step of the sampler (model.generate.decode_step: one token per row into the cache),
  rollout  the whole sampler as GRPO runs it (model.generate.rollout: prefill, then --completion-len tokens
           in one while loop, batch / G prompts x G) with the weights as placed; its row adds the all-gathers
           that run again for every generated token (inside the decode loop and the layer scan within it),
  rollout-gathered  the same with the weights as fxjax.decode_weights gathers them before decoding
           (mesh.gather_for_decoding),

the model is built abstractly (nnx.eval_shape: no weight is allocated), every input is a
jax.ShapeDtypeStruct carrying the sharding the training loop gives it (parameters by
fxjax.partition_rules.PARTITION_RULES, the optimiser state by train.run_setup.opt_state_shardings, batches over
("data", "fsdp")), and the program is lowered and compiled for a mesh of simulated CPU devices. One row
per (preset, program): per-device bytes of arguments, outputs, temporaries and their total (the
arguments counted once where donated outputs alias them) from compiled.memory_analysis(), and the
lowering and compile seconds.

Caveats, printed with the table:
* decoder layers and vision blocks are a Python loop unless --scan-layers (model.scan_layers): looped, the
  program, so the compile time, grows with depth (36 decoder layers at 3B, 80 at 72B, 32 vision blocks
  each); scanned, one layer and one block are compiled whatever the depth;
* the memory is XLA:CPU's plan for the CPU program. The arguments (weight shards, LoRA + optimiser state,
  batch, KV cache) are what a device holds on any backend. The temporaries are not: XLA:CPU runs bf16
  matmuls in float32, so it converts the all-gathered bf16 weights to float32 copies (seen in the HLO of
  the tiny decode step: the whole 151,936 x 64 embedding converted), and with the layers unrolled it keeps
  many layers' gathered weights live at once (the 3B and 7B decode steps' temp is about the float32 size
  of the whole decoder). A TPU/GPU compile computes in bf16, schedules the FSDP gathers per layer, and
  uses the fused attention kernels (model.attention: splash / cudnn), which never hold the [heads, q, k]
  float32 scores of the XLA attention compiled here.

    python bench/plan.py                                   # 3b,7b,32b,72b x sft,grpo,prefill,decode, fsdp 8
    python bench/plan.py --presets 7b --programs sft --mesh 1,8,1 --batch 8 --seq-len 8192
    python bench/plan.py --presets tiny --mesh 1,2,1 --seq-len 256 --image-tokens 16 --programs sft,decode
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROGRAMS = ("sft", "grpo", "prefill", "decode", "rollout", "rollout-gathered")
HEADER = (f"{'preset':6} {'program':8} {'mesh (d,f,t)':13} {'shape':34} {'args':>10} {'outputs':>10} "
          f"{'alias':>10} {'temp':>10} {'total':>10} {'lower s':>8} {'compile s':>9}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="3b,7b,32b,72b", help="comma-separated presets (fxjax.presets)")
    ap.add_argument("--programs", default="sft,grpo,prefill,decode",
                    help=f"comma-separated, from {','.join(PROGRAMS)} (default: the first four)")
    ap.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes; their product = simulated devices")
    ap.add_argument("--batch", type=int, default=None,
                    help="rows per step (SFT examples; GRPO completions P x G; sampler rows); default data x fsdp")
    ap.add_argument("--seq-len", type=int, default=8192, help="SFT tokens per row (the paper's max_len 8192)")
    ap.add_argument("--image-tokens", type=int, default=1024,
                    help="merged image tokens per row (one image per row; 1024 = a 896x896 image)")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="GRPO / sampler prompt tokens (default: image tokens + 256)")
    ap.add_argument("--completion-len", type=int, default=512, help="GRPO completion tokens (grpo default 512)")
    ap.add_argument("--num-generations", type=int, default=4, help="GRPO G (the paper: 4)")
    ap.add_argument("--dtype", default="bfloat16", help="compute and base-parameter dtype")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--remat", default="full", help="remat policy of decoder layers and vision blocks (model.remat)")
    ap.add_argument("--loss-chunk", type=int, default=256, help="lm_head rows per loss chunk (train.loss_chunk)")
    ap.add_argument("--json", type=Path, help="append each row as a JSON line here")
    ap.add_argument("--scan-layers", action="store_true",
                    help="decoder layers and vision blocks stacked under scan (model.scan_layers)")
    return ap.parse_args(argv)


def setup(devices: int) -> None:
    """Simulated CPU devices; must run before jax initialises its backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for path in (str(REPO), str(BENCH)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import jax

    jax.config.update("jax_num_cpu_devices", devices)


# ---- the model, abstractly ---------------------------------------------------------------------------


def abstract_model(preset: str, dtype: str, rank: int, scan_layers: bool = False):
    """(config, graphdef, params, base, rest) of the preset with all-linear LoRA, as shapes only."""
    from flax import nnx

    from fxjax.model import Qwen25VL
    from fxjax.model.lora import LoRAConfig, apply_lora
    from fxjax.presets import load_preset
    from fxjax.train.step import split_model

    cfg = load_preset(preset).with_scan_layers(scan_layers)

    def build():
        model = Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
        apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=0.05), rngs=nnx.Rngs(params=1, dropout=1))
        return model

    model = nnx.eval_shape(build)
    model.train()
    return (cfg, *split_model(model))


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying the matching shardings (`shardings` may be a prefix of
    `tree`, as the run's are: one NamedSharding per nnx.Variable)."""
    import jax
    from jax.sharding import NamedSharding

    def one(sharding, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub)

    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated_like(tree, mesh):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def train_state(params, base, rest, mesh, steps: int = 1000):
    """(tx, schedule, abstract TrainState, base, rest) with train.run_setup.init_state's shardings."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fxjax.partition_rules import param_shardings
    from fxjax.train.optimizer import make_optimizer
    from fxjax.train.run_setup import opt_state_shardings
    from fxjax.train.step import RNG_IMPL, TrainState
    from fxjax.config_sections import OptimSection

    tx, schedule = make_optimizer(OptimSection(), steps)
    replicated = NamedSharding(mesh, P())
    params_sh = param_shardings(params, mesh)
    state = TrainState(jax.ShapeDtypeStruct((), "int32"), params, jax.eval_shape(tx.init, params),
                       jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=RNG_IMPL))))
    state_sh = TrainState(replicated, params_sh, opt_state_shardings(tx, params, params_sh, replicated), replicated)
    return (tx, schedule, with_shardings(state, state_sh), with_shardings(base, param_shardings(base, mesh)),
            with_shardings(rest, replicated_like(rest, mesh)))


# ---- host batches of the right shapes (numpy zeros; only their shapes are used) --------------------------


def image_grid(tokens: int) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of `tokens` merged tokens, as square as `tokens` allows."""
    side = max(d for d in range(1, int(tokens ** 0.5) + 1) if tokens % d == 0)
    return (1, 2 * side, 2 * (tokens // side))


def rows_with_image(cfg, rows: int, length: int, image_tokens: int, supervised: int) -> dict:
    """`rows` rows of `length` tokens: text, <vision_start>, image pads, <vision_end>, text; the last
    `supervised` tokens labelled; one image of `image_tokens` merged tokens per row."""
    import numpy as np

    if image_tokens + 2 + supervised > length:
        raise SystemExit(f"{image_tokens} image tokens + 2 + {supervised} supervised tokens do not fit {length} tokens")
    row = np.full(length, 100, np.int32)
    row[1] = cfg.vision_start_token_id
    row[2:2 + image_tokens] = cfg.image_token_id
    row[2 + image_tokens] = cfg.vision_end_token_id
    labels = np.full(length, -100, np.int32)
    labels[length - supervised:] = 100
    grid = np.asarray([image_grid(image_tokens)] * rows, np.int64)
    patches = int(np.prod(grid[0]))
    return dict(input_ids=np.tile(row, (rows, 1)), attention_mask=np.ones((rows, length), np.int32),
                labels=np.tile(labels, (rows, 1)), image_grid_thw=grid,
                pixel_values=np.zeros((rows * patches, cfg.vision.patch_dim), np.float32))


def shaped(tree, shardings):
    """Host numpy tree -> ShapeDtypeStructs with `shardings` (None leaves stay None)."""
    import jax

    return jax.tree.map(lambda x, s: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings, is_leaf=lambda x: x is None)


# ---- the programs -----------------------------------------------------------------------------------------


def sft_program(cfg, graphdef, params, base, rest, mesh, a):
    from fxjax.train.batching import batch_shardings, build_step_batch
    from fxjax.train.step import make_train_step

    tx, schedule, state, base, rest = train_state(params, base, rest, mesh)
    host = build_step_batch([rows_with_image(cfg, a.batch, a.seq_len, a.image_tokens, a.completion_len)], cfg, 0,
                            batch_shards=vision_shards(mesh, a.batch))
    batch = shaped(host, batch_shardings(host, mesh))
    step = make_train_step(graphdef, tx, schedule, loss_chunk=a.loss_chunk, remat=a.remat, remat_vision=a.remat,
                           state_shardings=sh_of(state), base_shardings=sh_of(base),
                           rest_shardings=sh_of(rest), batch_shardings=sh_of(batch))
    shape = f"B{a.batch} x L{a.seq_len} (img {a.image_tokens})"
    return step, (state, base, rest, batch), shape


def grpo_program(cfg, graphdef, params, base, rest, mesh, a):
    import numpy as np

    from fxjax.train.grpo import _group_batch_shardings
    from fxjax.train.grpo_step import LossOptions, make_grpo_step
    from fxjax.train.rollout import Rollout, build_group_batch

    g = a.num_generations
    if a.batch % g:
        raise SystemExit(f"--batch {a.batch} is not a multiple of --num-generations {g} (rows = prompts x G)")
    prompts = a.batch // g
    tx, schedule, state, base, rest = train_state(params, base, rest, mesh)
    host_prompts = rows_with_image(cfg, prompts, a.prompt_len, a.image_tokens, 0)
    n = a.completion_len
    tokens = np.zeros((a.batch, n), np.int32)
    rollout = Rollout(tokens, np.ones_like(tokens), np.ones((a.batch, n), np.float32), np.zeros(a.batch, bool),
                      [], {}, np.zeros(a.batch, np.float32))
    # beta > 0 (the default 0.04): the update reads the reference log-probs
    host, _ = build_group_batch(host_prompts, rollout, cfg, num_generations=g, n_micro=1, floor={},
                                share_prompts=False, ref_logps=np.zeros((a.batch, n), np.float32),
                                batch_shards=vision_shards(mesh, prompts))
    batch = shaped(host, _group_batch_shardings(host, mesh, True))
    step = make_grpo_step(graphdef, tx, schedule, opts=LossOptions(max_completion_length=n), loss_chunk=a.loss_chunk,
                          remat=a.remat, remat_vision=a.remat, state_shardings=sh_of(state),
                          base_shardings=sh_of(base), rest_shardings=sh_of(rest), batch_shardings=sh_of(batch))
    shape = f"{prompts}x G{g}, L{a.prompt_len}+{n} (img {a.image_tokens})"
    return step, (state, base, rest, batch), shape


def _sampler_args(params, base, rest, mesh):
    from fxjax.partition_rules import param_shardings

    return (with_shardings(params, param_shardings(params, mesh)), with_shardings(base, param_shardings(base, mesh)),
            with_shardings(rest, replicated_like(rest, mesh)))


def prefill_program(cfg, graphdef, params, base, rest, mesh, a):
    import jax
    from flax import nnx

    from fxjax.device_mesh import inputs_shardings
    from fxjax.model.generate import prefill
    from fxjax.model.inputs import prepare_inputs
    from fxjax.train.step import OnMesh

    host = rows_with_image(cfg, a.batch, a.prompt_len, a.image_tokens, 0)
    shards = vision_shards(mesh, a.batch)
    inputs = prepare_inputs(cfg, host["input_ids"], host["attention_mask"], host["pixel_values"],
                            host["image_grid_thw"], batch_shards=shards if shards > 1 else None)
    cache_len = a.prompt_len + a.completion_len

    def run(params, base, rest, inputs):
        model = nnx.merge(graphdef, params, base, rest)
        model.eval()
        return prefill(model, inputs, cache_len)

    args = (*_sampler_args(params, base, rest, mesh), shaped(inputs, inputs_shardings(inputs, mesh)))
    return OnMesh(jax.jit(run), mesh), args, f"B{a.batch} x L{a.prompt_len}, cache {cache_len}"


def decode_program(cfg, graphdef, params, base, rest, mesh, a):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fxjax.model.generate import decode_step, init_cache
    from fxjax.device_mesh import batch_spec
    from fxjax.train.step import OnMesh

    cache_len = a.prompt_len + a.completion_len

    def run(params, base, rest, tokens, positions, cache):
        model = nnx.merge(graphdef, params, base, rest)
        model.eval()
        return decode_step(model, tokens, positions, cache)

    model = nnx.merge(graphdef, params, base, rest)
    cache = jax.eval_shape(lambda: init_cache(model, a.batch, cache_len))
    # the cache's rows: dim 0, or dim 1 of the stacked keys / values [layers, B, ...] of scanned layers
    rows = lambda x: NamedSharding(mesh, batch_spec(x.ndim, int(x.ndim == 5)) if x.ndim else P())  # noqa: E731
    cache = with_shardings(cache, jax.tree.map(rows, cache))
    row = jax.ShapeDtypeStruct((a.batch,), jnp.int32, sharding=NamedSharding(mesh, batch_spec(1, 0)))
    args = (*_sampler_args(params, base, rest, mesh), row, row, cache)
    return OnMesh(jax.jit(run, donate_argnums=(5,)), mesh), args, f"B{a.batch}, cache {cache_len}"


def rollout_program(cfg, graphdef, params, base, rest, mesh, a, gathered: bool = False):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from fxjax.decode_weights import gathered_spec
    from fxjax.device_mesh import inputs_shardings
    from fxjax.model.generate import rollout
    from fxjax.model.inputs import prepare_inputs
    from fxjax.train.step import OnMesh

    g = a.num_generations
    if a.batch % g:
        raise SystemExit(f"--batch {a.batch} is not a multiple of --num-generations {g} (rows = prompts x G)")
    prompts = a.batch // g
    host = rows_with_image(cfg, prompts, a.prompt_len, a.image_tokens, 0)
    shards = vision_shards(mesh, prompts)
    inputs = prepare_inputs(cfg, host["input_ids"], host["attention_mask"], host["pixel_values"],
                            host["image_grid_thw"], batch_shards=shards if shards > 1 else None)

    def run(params, base, rest, inputs, rng):
        model = nnx.merge(graphdef, params, base, rest)
        model.eval()
        return rollout(model, inputs, rng, jnp.asarray([2, -1, -1, -1], jnp.int32), jnp.int32(0), 1.0,
                       num_generations=g, max_new_tokens=a.completion_len, top_k=50)

    weights = _sampler_args(params, base, rest, mesh)
    if gathered:  # as fxjax.decode_weights.weights_for_decoding lays them out
        whole = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(  # noqa: E731
            mesh, gathered_spec(x.sharding.spec)))
        weights = jax.tree.map(whole, weights)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    args = (*weights, shaped(inputs, inputs_shardings(inputs, mesh)), rng)
    how = "gathered" if gathered else "as placed"
    return OnMesh(jax.jit(run), mesh), args, f"{prompts}x G{g}, L{a.prompt_len}+{a.completion_len}, {how}"


def per_token_all_gathers(compiled_text: str) -> tuple[int, int]:
    """(all-gathers, their bytes) that run for each generated token: those in the decode loop's body (a while
    loop of the entry computation with no known trip count) and in what it runs: the loops inside it (the
    layer scan) times their trip counts, the computations it calls, a conditional's costliest branch.
    XLA:CPU's synchronous all-gathers; an async -start's result tuple counts its last shape."""
    import re

    import numpy as np

    sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
    blocks, entry = {}, ""
    for block in re.split(r"\n(?=\S)", compiled_text):
        name = re.match(r"(ENTRY )?%?([\w.\-]+)", block)
        if name:
            blocks[name.group(2)] = block
            entry = block if name.group(1) else entry
    loop = re.compile(r"while\(.*?body=%?([\w.\-]+)(.*)")

    def gathers(body: str) -> tuple[int, int]:
        count = size = 0
        for line in blocks.get(body, "").splitlines():
            m = re.search(r"= \(?(?:.*, )?(\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", line)
            if m:
                count += 1
                size += sizes.get(m.group(1), 4) * int(np.prod([int(d) for d in m.group(2).split(",") if d]))
            inner = loop.search(line)
            if inner:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', inner.group(2))
                n = int(trips.group(1)) if trips else 1
                c, b = gathers(inner.group(1))
                count, size = count + n * c, size + n * b
            called = re.search(r" call\(.*?to_apply=%?([\w.\-]+)", line)
            if called:
                c, b = gathers(called.group(1))
                count, size = count + c, size + b
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                costs = [gathers(b.strip().lstrip("%")) for b in branches.group(1).split(",")]
                c, b = max(costs, key=lambda cost: cost[1])
                count, size = count + c, size + b
        return count, size

    count = size = 0
    for body, rest in loop.findall(entry):
        if '"known_trip_count"' not in rest:  # the decode loop (a scan knows its trip count)
            c, b = gathers(body)
            count, size = count + c, size + b
    return count, size


def vision_shards(mesh, rows: int) -> int:
    """Batch shards the vision is packed for, as the training loop does: data x fsdp when `rows` (prompts for
    GRPO) split over them, else 1 (one replicated sequence)."""
    from fxjax.device_mesh import batch_shards

    shards = batch_shards(mesh)
    return shards if rows % shards == 0 else 1


def sh_of(tree):
    import jax

    return jax.tree.map(lambda x: None if x is None else x.sharding, tree, is_leaf=lambda x: x is None)


BUILDERS = {"sft": sft_program, "grpo": grpo_program, "prefill": prefill_program, "decode": decode_program,
            "rollout": rollout_program,
            "rollout-gathered": lambda *args: rollout_program(*args, gathered=True)}


# ---- measuring ----------------------------------------------------------------------------------------------


def measure(program: str, preset: str, model, mesh, a) -> dict:
    cfg, graphdef, params, base, rest = model
    fn, args, shape = BUILDERS[program](cfg, graphdef, params, base, rest, mesh, a)
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    row = dict(preset=preset, program=program, mesh=list(mesh.devices.shape), shape=shape, dtype=a.dtype,
               lora_rank=a.lora_rank, argument=arg, output=out, alias=alias, temp=temp,
               total=arg + out - alias + temp, lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1))
    if program.startswith("rollout"):
        row["token_all_gathers"], row["token_all_gather_bytes"] = per_token_all_gathers(compiled.as_text())
    return row


def row_line(r: dict) -> str:
    from sharding_memory import _fmt

    return (f"{r['preset']:6} {r['program']:8} {str(tuple(r['mesh'])):13} {r['shape']:34} {_fmt(r['argument']):>10} "
            f"{_fmt(r['output']):>10} {_fmt(r['alias']):>10} {_fmt(r['temp']):>10} {_fmt(r['total']):>10} "
            f"{r['lower_s']:8.1f} {r['compile_s']:9.1f}")


def main(argv=None) -> int:
    a = parse_args(argv)
    sizes = tuple(int(x) for x in a.mesh.split(","))
    if len(sizes) != 3 or min(sizes) < 1:
        raise SystemExit(f"--mesh: three positive sizes data,fsdp,tensor, got {a.mesh!r}")
    programs = [p for p in a.programs.split(",") if p]
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise SystemExit(f"--programs: unknown {unknown}; choose from {list(PROGRAMS)}")
    a.batch = a.batch or sizes[0] * sizes[1]
    a.prompt_len = a.prompt_len or a.image_tokens + 256
    setup(sizes[0] * sizes[1] * sizes[2])
    import flax
    import jax

    from forward import machine_line
    from fxjax.presets import load_preset
    from fxjax.device_mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(*sizes))
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"fxjax compile and memory plan, {today}; jax {jax.__version__}, flax {flax.__version__}; {machine_line()}")
    print(f"{jax.device_count()} simulated CPU devices, mesh data,fsdp,tensor = {sizes}; {a.dtype} weights and "
          f"compute, LoRA r{a.lora_rank} all-linear (float32) + AdamW, remat {a.remat}, loss chunk {a.loss_chunk}")
    print("per-device bytes from compiled.memory_analysis(); total = args + outputs - alias (donated) + temp")
    print("note: layers under scan (one layer compiled whatever the depth)" if a.scan_layers else
          "note: layers are a Python loop (--scan-layers: under scan), so compile time grows with depth", flush=True)
    print("note: args are what a device holds on any backend; temp is XLA:CPU's (float32 copies of gathered bf16 "
          "weights, XLA attention scores), not a TPU/GPU plan (see the docstring)", flush=True)
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"):
        print("note: JAX_DISABLE_MOST_OPTIMIZATIONS is set: not the optimised program's memory", flush=True)
    print(HEADER, flush=True)
    for preset in a.presets.split(","):
        load_preset(preset)  # a wrong name fails here, with the list of presets
        t = time.perf_counter()
        model = abstract_model(preset, a.dtype, a.lora_rank, a.scan_layers)
        build_s = round(time.perf_counter() - t, 1)
        print(f"# {preset}: abstract model with LoRA built in {build_s} s (nnx.eval_shape)", file=sys.stderr, flush=True)
        for program in programs:
            print(f"# {preset} {program}: lowering + compiling ...", file=sys.stderr, flush=True)
            r = dict(measure(program, preset, model, mesh, a), build_s=build_s)
            print(row_line(r), flush=True)
            if "token_all_gathers" in r:
                from sharding_memory import _fmt

                print(f"       each generated token: {r['token_all_gathers']} all-gathers of "
                      f"{_fmt(r['token_all_gather_bytes'])} per device", flush=True)
            if a.json:
                with a.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
