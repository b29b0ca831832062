"""Per-device FLOPs of the vision part of the forward (and its LoRA backward) on a mesh, from XLA's compiled
cost analysis: images packed per batch shard vs one packed sequence replicated on every device.

The program is `model.embed(inputs)`: the vision encoder (patch embedding, window and full-attention
blocks, merger) and the placement of its features at the image tokens (the token embedding beside it
is a gather, no FLOPs); with --backward also the gradient of its sum with respect to the LoRA
parameters (what the SFT step's backward adds for the vision encoder). Each layout is lowered from
shapes alone (jax.ShapeDtypeStruct with the shardings the training loop gives: parameters by
fxjax.partition_rules' rules, the batch over ("data", "fsdp")) and compiled for simulated CPU devices;
`compiled.cost_analysis()["flops"]` is the FLOPs of the partitioned program, i.e. per device.

Layouts (B rows, one image per row):
  packed    every image of the batch in one sequence (`prepare_inputs(batch_shards=None)`), replicated:
            what each device ran before the vision was built per shard; on one device, the reference;
  sharded   each batch shard's images packed on their own, stacked [S, ...] and split over data x fsdp
            (`prepare_inputs(batch_shards=S)`, what the training loop builds).

    python bench/vision_flops.py                                   # 3b vision (8 blocks), 8 x 448x448 images
    python bench/vision_flops.py --preset tiny --vision-depth 0 --grid 1,8,8 --meshes 1,1,1 1,8,1 \
        --layouts sharded                                          # smallest case (tests/test_vision_shards.py)
    python bench/vision_flops.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from forward import cpu_model  # noqa: E402  (bench/forward.py: the CPU's model name; imports no jax)
from plan import setup  # noqa: E402  (bench/plan.py: simulated CPU devices before jax's backend starts)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="3b", help="model preset (fxjax.presets); only its vision encoder runs")
    ap.add_argument("--vision-depth", type=int, default=8,
                    help="vision blocks kept (FLOPs per block do not depend on depth; fewer compile faster); "
                         "0 keeps the preset's")
    ap.add_argument("--batch", type=int, default=8, help="rows, one image each")
    ap.add_argument("--grid", default="1,32,32", help="t,h,w patch grid of every image (1,32,32 = 448x448)")
    ap.add_argument("--mixed", action="store_true",
                    help="images of different sizes: row i gets h = w = grid side - 2*(i %% 4) (even, >= 4)")
    ap.add_argument("--meshes", nargs="*", default=["1,1,1", "1,8,1", "8,1,1"], help="data,fsdp,tensor sizes")
    ap.add_argument("--layouts", default="packed,sharded",
                    help="layouts measured on meshes of several batch shards (one device: packed, the reference)")
    ap.add_argument("--backward", action="store_true", help="also the LoRA gradient of the vision part")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--json", type=Path, help="write the rows here")
    return ap.parse_args(argv)


def model_config(preset: str, depth: int):
    """The preset with its decoder cut to one layer (the program never runs it) and `depth` vision blocks
    (full attention where the preset has it below `depth`, else in the last block)."""
    from fxjax.presets import load_preset

    cfg = load_preset(preset)
    text = dataclasses.replace(cfg.text, num_hidden_layers=1)
    vision = cfg.vision
    if depth:
        full = tuple(i for i in vision.fullatt_block_indexes if i < depth) or (depth - 1,)
        vision = dataclasses.replace(vision, depth=depth, fullatt_block_indexes=full)
    return cfg.replace(text=text, vision=vision)


def host_batch(cfg, rows: int, grid: tuple[int, int, int], mixed: bool) -> dict:
    """`rows` rows: text, <vision_start>, one image's pads, <vision_end>; zero pixels (only shapes count)."""
    import numpy as np

    t, h, w = grid
    grids = [(t, max(4, h - 2 * (i % 4)), max(4, w - 2 * (i % 4))) if mixed else (t, h, w) for i in range(rows)]
    tokens = [g[0] * g[1] * g[2] // cfg.vision.merge_unit for g in grids]
    length = max(tokens) + 8
    ids = np.full((rows, length), 100, np.int32)
    for r, n in enumerate(tokens):
        ids[r, 1], ids[r, 2 + n] = cfg.vision_start_token_id, cfg.vision_end_token_id
        ids[r, 2:2 + n] = cfg.image_token_id
    grid_thw = np.asarray(grids, np.int64)
    pixels = np.zeros((int(np.prod(grid_thw, axis=1).sum()), cfg.vision.patch_dim), np.float32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pixels, image_grid_thw=grid_thw)


def abstract_model(cfg, rank: int):
    """(graphdef, LoRA params, everything else) as shapes only (all-linear LoRA)."""
    from flax import nnx

    from fxjax.model import Qwen25VL
    from fxjax.model.lora import LORA_PARAMS, LoRAConfig, apply_lora

    def build():
        model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
        apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank), rngs=nnx.Rngs(params=1))
        return model

    model = nnx.eval_shape(build)
    model.eval()
    return nnx.split(model, LORA_PARAMS, ...)


def shaped(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings, is_leaf=lambda x: x is None)


COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


def collective_bytes(hlo: str) -> int:
    """Bytes produced by the cross-device collectives of a partitioned HLO module (per device, each op
    once, from its result shapes): what the layout costs in communication besides FLOPs."""
    total = 0
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match:
            for dtype, dims in SHAPE.findall(match.group(1)):
                total += BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def measure(cfg, graphdef, params, rest, host: dict, mesh_shape, layout: str, backward: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from plan import with_shardings  # bench/plan.py: parameters as ShapeDtypeStructs with their shardings

    from fxjax.model.inputs import prepare_inputs
    from fxjax.device_mesh import MeshConfig, batch_shards, inputs_shardings, make_mesh, use_mesh
    from fxjax.partition_rules import param_shardings

    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[:math.prod(mesh_shape)])
    shards = batch_shards(mesh)
    inputs = prepare_inputs(cfg, host["input_ids"], host["attention_mask"], host["pixel_values"],
                            host["image_grid_thw"], batch_shards=shards if layout == "sharded" else None)
    args = (with_shardings(params, param_shardings(params, mesh)), with_shardings(rest, param_shardings(rest, mesh)),
            shaped(inputs, inputs_shardings(inputs, mesh)))

    def embed(params, rest, inputs):
        return nnx.merge(graphdef, params, rest).embed(inputs)

    def grad(params, rest, inputs):
        return jax.grad(lambda p: embed(p, rest, inputs).astype(jnp.float32).sum())(params)

    row = dict(mesh=",".join(map(str, mesh_shape)), layout=layout, batch_shards=shards if layout == "sharded" else 1,
               vision_slots=list(inputs.vision.valid.shape))
    for name, fn in (("forward", embed), ("backward", grad))[:2 if backward else 1]:
        t0 = time.perf_counter()
        with use_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
        row[f"{name}_flops"] = flops_of(compiled)
        row[f"{name}_collective_bytes"] = collective_bytes(compiled.as_text())
        row[f"{name}_compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def run(a: argparse.Namespace) -> dict:
    meshes = [tuple(int(x) for x in m.split(",")) for m in a.meshes]
    devices = max(m[0] * m[1] * m[2] for m in meshes)
    setup(devices)
    import jax

    cfg = model_config(a.preset, a.vision_depth)
    grid = tuple(int(x) for x in a.grid.split(","))
    host = host_batch(cfg, a.batch, grid, a.mixed)
    graphdef, params, rest = abstract_model(cfg, a.lora_rank)
    import jaxlib

    info = dict(cpu=cpu_model(), jax=jax.__version__, jaxlib=jaxlib.__version__, devices=jax.device_count(),
                preset=a.preset,
                vision_depth=cfg.vision.depth, vision_hidden=cfg.vision.hidden_size, batch=a.batch,
                grids=host["image_grid_thw"].tolist(), rows=[])
    print(f"cpu: {info['cpu']}; jax {info['jax']} (jaxlib {info['jaxlib']}), {info['devices']} simulated CPU devices")
    print(f"vision of preset {a.preset}: depth {cfg.vision.depth}, hidden {cfg.vision.hidden_size}; "
          f"{a.batch} rows, one image each, grids {sorted(set(map(tuple, info['grids'])))}")
    reference = None
    for shape in meshes:
        layouts = ["packed"] if shape[0] * shape[1] == 1 else a.layouts.split(",")
        for layout in layouts:
            row = measure(cfg, graphdef, params, rest, host, shape, layout, a.backward)
            if reference is None:
                reference = row
            for name in ("forward", "backward"):
                if f"{name}_flops" in row:
                    row[f"{name}_vs_one_device"] = row[f"{name}_flops"] / reference[f"{name}_flops"]
            info["rows"].append(row)
            cols = "  ".join(f"{n}: {row[f'{n}_flops']:.4g} FLOPs/device ({row[f'{n}_vs_one_device']:.4f} of 1 device), "
                             f"collectives {row[f'{n}_collective_bytes'] / 2**20:.2f} MiB"
                             for n in ("forward", "backward") if f"{n}_flops" in row)
            print(f"mesh {row['mesh']:7} {layout:8} vision {str(row['vision_slots']):10} {cols}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    run(parse_args())
