"""Subprocess worker for tests/test_sharding.py and tests/test_multihost.py.

JAX fixes its device count when its backend starts, so the multi-device checks run here, in a fresh
process, and print/write JSON the tests assert on. Importing this module touches no JAX backend.

    python tests/sharding_worker.py meshes CKPT OUT.json [--meshes 1,8,1 2,2,2 ...]
        8 simulated CPU devices: single-device reference (the real SFT step of train.step with 2
        accumulated micro-batches: loss, updated LoRA parameters; logits and LoRA gradients of its loss
        function), then per mesh the same from fxjax.from_pretrained(CKPT, mesh=...) with the run's state
        shardings and the images packed per batch shard (build_step_batch's batch_shards), plus
        shard-shape and optimiser-state checks, per-device bytes and an export round trip.
    python tests/sharding_worker.py multihost CKPT OUTDIR [--meshes 1,8,1 2,2,2]
        one of several processes (FXJAX_COORDINATOR / FXJAX_NUM_PROCESSES / FXJAX_PROCESS_ID /
        FXJAX_LOCAL_DEVICE_COUNT in the environment): load onto one global mesh, logits, export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from numerics import rel_err

REPO = Path(__file__).resolve().parents[1]
# Each axis alone (data, fsdp, tensor) and all three combined; (2,2,2) also covers fsdp with tensor (the
# LoRA specs where fsdp does not divide on top of tensor are checked from shapes in test_sharding.py).
MESHES = ((1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8))  # data alone: the multi-process tests' layout; (1, 2, 4): fsdp and tensor without data
# Every dimension a rule shards is divisible by 8 (tensor heads 8 / kv 4 of 8, MLP 48, vision 64 / 40,
# merger 256, vocab 128, patch row 1176), so on every mesh every rule really splits its parameter.
# One decoder layer (the step compiles five times; the per-layer mapping is checked by the HF round trips)
# and three vision blocks (windowed, full, windowed). With two vision blocks the (1,1,8) step's merger
# LoRA A came out 1.6e-5 from one device (Adam's first step turns near-zero gradient entries into +-lr):
# not a bug found, but not this test's tolerance either.
CHECKPOINT_KW = dict(hidden=64, heads=8, kv_heads=4, vision_hidden=64, vision_heads=8, vocab_size=128, layers=1,
                     vision_depth=3, fullatt=(1,))
LORA_KW = dict(rank=4, alpha=8.0, target_modules="all-linear")
BATCH, LENGTH = 8, 24
LR = 1e-4  # the authors' LoRA learning rate (configs/recipes/paper_3b_sft.yaml)
IMAGE, VISION_START, VISION_END = 100, 102, 103


def build_checkpoint(directory: Path) -> Path:
    """A tiny HF Qwen2.5-VL (transformers' own save_pretrained) whose sharded dims all divide by 8."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_hf_model, save_hf_model

    return save_hf_model(build_hf_model(seed=1, **CHECKPOINT_KW), Path(directory))


IMAGES = ((0, 2, (1, 8, 8)), (3, 5, (1, 4, 8)))  # (row, vision-start position, grid): 16 and 8 image tokens


def batch(seed: int = 0, images=IMAGES) -> dict[str, np.ndarray]:
    """HF-shaped inputs: 8 rows, some with an image (each its own size), one left-padded; plus next-token
    targets."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 90, size=(BATCH, LENGTH)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, start, grid in images:
        n = int(np.prod(grid)) // 4  # 2x2 patches merge into one token
        ids[row, start], ids[row, start + 1:start + 1 + n], ids[row, start + 1 + n] = VISION_START, IMAGE, VISION_END
    mask[1, :5] = 0
    ids[1, :5] = 0
    grid = np.array([g for _, _, g in images], np.int64)
    pixel_values = rng.randn(int(np.prod(grid, axis=1).sum()), 1176).astype(np.float32)
    targets = np.roll(ids, -1, axis=1)
    weights = (mask * np.roll(mask, -1, axis=1)).astype(np.float32)
    weights[:, -1] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                targets=targets, weights=weights)


def rel(out, ref) -> float:
    return rel_err(out, ref, floor=0.0)


# ---- JAX side (imported lazily, after the device count is set) ---------------------------------------

def _setup(devices: int) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_default_matmul_precision", "highest")


def _functions():
    from flax import nnx

    @nnx.jit
    def forward(model, inputs):
        hidden, _ = model.hidden_states(inputs)
        return model.logits(hidden)

    return forward


def _set_lora_b(model):
    """Fixed non-zero B (fresh adapters have B = 0, which would leave A without gradient), written onto
    B's existing shards."""
    import jax.numpy as jnp

    from fxjax import device_mesh
    from fxjax.model.lora import lora_linears

    rng = np.random.RandomState(7)
    for _, linear in lora_linears(model):
        b = linear.lora.lora_b
        value = (0.05 * rng.randn(*b.shape)).astype(np.float32)
        current = b.get_value()
        b.set_value(device_mesh.put(value, current.sharding) if len(current.sharding.device_set) > 1 else jnp.asarray(value))
    return model


def _host_inputs(model, data, batch_shards=None):
    return model.prepare(data["input_ids"], data["attention_mask"], data["pixel_values"], data["image_grid_thw"],
                         batch_shards=batch_shards)


DECODE_TOKENS = 5
DECODE_MESHES = ((1, 8, 1), (2, 2, 2))  # fsdp alone, and with data and tensor
def decode_report(model, mesh, data) -> dict:
    """Greedy tokens of `data`'s prompts and the all-gathers in the compiled decode loop, by the real
    sampler (model.generate.sample_groups: rollout_jit), with the weights as placed ("sharded") and as
    fxjax.decode_weights gathers them for decoding ("gathered"); plus the gathered copy's layout and
    whether the model's own weights kept theirs."""
    import jax
    from flax import nnx

    from fxjax import device_mesh
    from fxjax.decode_weights import decode_plan, weights_for_decoding
    from fxjax.model import generate

    sys.path.insert(0, str(REPO / "bench"))
    from plan import per_token_all_gathers

    model.eval()
    inputs = _host_inputs(model, data, None if mesh is None else device_mesh.batch_shards(mesh))
    if mesh is not None:
        inputs = device_mesh.shard_inputs(inputs, mesh)
    report = {}
    models = {"sharded": model}
    if mesh is not None:
        models["gathered"] = weights_for_decoding(model, decode_plan(model, "always"))
        compiles = []  # a second gather (the next rollout's) reuses the first's program
        listener = lambda event, seconds, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            weights_for_decoding(model, True)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        report["second_gather_compiles"] = len(compiles)
        specs = lambda m: {str(k): str(v.get_value().sharding.spec) for k, v in nnx.to_flat_state(nnx.state(m))}
        report["gathered_specs_with_fsdp"] = [k for k, v in specs(models["gathered"]).items() if "fsdp" in v]
        report["model_specs_with_fsdp"] = len([k for k, v in specs(model).items() if "fsdp" in v])
    args = dict(eos_token_ids=(2,), pad_token_id=0)
    for name, m in models.items():
        with device_mesh.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            out = generate.generate_device(m, inputs, max_new_tokens=DECODE_TOKENS, **args)
            if mesh is not None:  # (the program generate_device ran: its arguments as sample_groups passes them)
                eos, pad = generate._special_tokens(m, (2,), 0)
                lowered = generate.rollout_jit.lower(m, inputs, jax.random.key(0), eos, np.int32(pad), np.float32(1.0),
                                                     None, num_generations=1, max_new_tokens=DECODE_TOKENS, greedy=True,
                                                     top_k=None, top_p=None)
                # (bench/plan.py's count of what each generated token runs: the decode loop and the loops in it)
                report[f"{name}_loop_all_gathers"] = per_token_all_gathers(lowered.compile().as_text())[0]
        report[f"{name}_tokens"] = np.asarray(device_mesh.gather(out.tokens)).tolist()
    return report


def _local_part_check(model, data, mesh) -> tuple[tuple[int, ...], bool]:
    """(the batch shards this process holds, whether the global step batch assembled from each process's
    part (its rows only, `place_local_batch`) has on this process's devices exactly what the whole batch
    placed by every process (`place_batch`) has)."""
    import jax

    from fxjax import device_mesh
    from fxjax.train.batching import batch_shardings, build_step_batch, grow_floor, place_batch, place_local_batch

    shards, held = device_mesh.batch_shards(mesh), device_mesh.process_batch_shards(mesh)
    per = BATCH // shards
    rows = [r for s in held for r in range(s * per, (s + 1) * per)]
    whole = {k: data[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    whole["labels"] = np.where(data["attention_mask"] > 0, data["input_ids"], -100)
    starts = np.concatenate([[0], np.cumsum(np.prod(whole["image_grid_thw"], axis=1))])
    kept = [i for i, (row, _, _) in enumerate(IMAGES) if row in rows]  # IMAGES are in row order
    part = {k: whole[k][rows] for k in ("input_ids", "attention_mask", "labels")}
    part["image_grid_thw"] = whole["image_grid_thw"][kept]
    part["pixel_values"] = np.concatenate([whole["pixel_values"][starts[i]:starts[i + 1]] for i in kept]
                                          or [np.zeros((0, 1176), np.float32)])
    full = build_step_batch([whole], model.config, 0, batch_shards=shards)
    floor = grow_floor({}, full, model.config, shards)
    mine = build_step_batch([part], model.config, 0, floor=floor, batch_shards=len(held), shard_ids=held)
    a = place_local_batch(mine, batch_shardings(mine, mesh, built_shards=len(held)), len(held))
    b = place_batch(full, batch_shardings(full, mesh))
    equal = True
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        ys = {s.device: s for s in y.addressable_shards}
        equal &= x.shape == y.shape and all(np.array_equal(np.asarray(s.data), np.asarray(ys[s.device].data))
                                            for s in x.addressable_shards)
    return held, bool(equal)


def _loss_collectives(model, placed, mesh, loss_chunk: int) -> list[str]:
    """The collectives (other than of scalars) in the compiled gradient, with respect to the hidden states,
    of the step's chunked loss on micro-batch 0 under `mesh`: none when each device gathers and scores only
    its own rows' targets (a gather over the whole flattened batch all-gathers or all-reduces them)."""
    import jax

    from fxjax import device_mesh
    from fxjax.model.batch_axis import batch_parts
    from fxjax.train.losses import LossTargets, chunked_cross_entropy

    targets = LossTargets(*(t[0] for t in placed.targets))
    rows, length = placed.inputs.input_ids.shape[1:3]
    width = model.config.text.hidden_size
    hidden = jax.device_put(np.ones((rows, length, width), np.float32), device_mesh.batch_sharding(mesh, 3))
    head = np.ones((width, 64), np.float32)  # a replicated stand-in lm_head: FSDP's gather of the real one aside

    def loss(hidden, targets):
        return chunked_cross_entropy(hidden, targets, lambda h: h @ head, loss_chunk, shards=batch_parts(rows))[0]

    with device_mesh.use_mesh(mesh):
        text = jax.jit(jax.grad(loss)).lower(hidden, targets).compile().as_text()
    return [line.strip()[:160] for line in text.splitlines()
            if any(f"{op}(" in line for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
            and "[]" not in line.split("=", 1)[1].split("(", 1)[0]]


def _flat_host(state) -> dict[str, np.ndarray]:
    from flax import nnx

    from fxjax.device_mesh import gather
    from fxjax.partition_rules import path_str

    return {path_str(p): gather(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}


def shard_report(model, mesh) -> dict:
    """Per parameter: every addressable shard has the shape its spec implies; how many really split."""
    from flax import nnx

    from fxjax import device_mesh, partition_rules
    from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS

    sizes = device_mesh.axis_sizes(mesh)
    specs = dict(nnx.to_flat_state(partition_rules.partition_specs(model, mesh)))
    bad, split, total, lora_split = [], 0, 0, 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        spec = specs[path]
        if value.sharding.spec != spec and not value.sharding.is_equivalent_to(
                device_mesh.NamedSharding(mesh, spec), value.ndim):
            bad.append(f"{partition_rules.path_str(path)}: sharding {value.sharding.spec} != rule {spec}")
        expected = list(value.shape)
        for dim, entry in enumerate(spec):
            if entry is not None:
                axes = (entry,) if isinstance(entry, str) else entry
                expected[dim] //= math.prod(sizes[a] for a in axes)
        shapes = {tuple(s.data.shape) for s in value.addressable_shards}
        if shapes != {tuple(expected)}:
            bad.append(f"{partition_rules.path_str(path)}: shard shapes {shapes} != {tuple(expected)}")
        total += 1
        if tuple(expected) != tuple(value.shape):
            split += 1
            lora_split += isinstance(variable, nnx.LoRAParam)
    base = partition_rules.device_bytes(model, BASE_PARAMS)
    lora = partition_rules.device_bytes(model, LORA_PARAMS)
    return dict(bad=bad, split=split, total=total, lora_split=lora_split,
                base_bytes_per_device=sorted(base.values()), lora_bytes_per_device=sorted(lora.values()),
                replicated_dims=[tuple(d) for d in partition_rules.replicated_dims(model, mesh)])


def _drift(node, mesh) -> list[str]:
    """Variables whose sharding differs from the rules' (after a jitted step)."""
    from flax import nnx

    from fxjax import device_mesh, partition_rules

    out = []
    for path, variable in nnx.to_flat_state(nnx.state(node)):
        value = variable.get_value()
        if not hasattr(value, "sharding") or not value.ndim:
            continue
        spec = partition_rules.state_spec(path, value.shape, mesh, is_param=isinstance(variable, nnx.Param))
        if not value.sharding.is_equivalent_to(device_mesh.NamedSharding(mesh, spec), value.ndim):
            out.append(f"{partition_rules.path_str(path)}: {value.sharding.spec} != {spec}")
    return out


def micro_batches() -> list[dict[str, np.ndarray]]:
    """Two pipeline-shaped micro-batches (input_ids, attention_mask, labels, pixel_values, image_grid_thw)
    of BATCH rows for one step of grad_accum 2; four images of four sizes."""
    out = []
    for seed, images in ((0, IMAGES), (1, ((2, 3, (1, 4, 4)), (5, 2, (1, 8, 4))))):
        data = batch(seed, images)
        ids = data["input_ids"]
        labels = np.where(data["attention_mask"] == 1, ids, -100)
        labels[np.isin(ids, (IMAGE, VISION_START, VISION_END))] = -100
        labels[:, :2] = -100
        out.append(dict(input_ids=ids, attention_mask=data["attention_mask"], labels=labels,
                        pixel_values=data["pixel_values"], image_grid_thw=data["image_grid_thw"]))
    return out


def _opt_report(opt_state, params) -> dict:
    """Every optimiser-state leaf that mirrors a LoRA parameter (Adam's mu, nu) has that parameter's
    sharding; per-device bytes of the optimiser state."""
    import jax

    from fxjax.train.checkpointing import flatten_tree

    flat_params = flatten_tree(params)
    mirrored, mismatch, per_device = 0, [], {}
    for name, leaf in flatten_tree(opt_state).items():
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        owner = [p for p in flat_params if name.endswith("." + p)]
        if not owner:
            if leaf.ndim:
                mismatch.append(f"{name}: mirrors no parameter")
            continue
        mirrored += 1
        param = flat_params[owner[0]]
        if leaf.shape != param.shape or not leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim):
            mismatch.append(f"{name}: {leaf.sharding.spec} != {param.sharding.spec}")
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
    return dict(opt_mirrored=mirrored, opt_mismatch=mismatch, opt_bytes_total=total,
                opt_bytes_per_device=sorted(per_device.values()))


def run_meshes(checkpoint: Path, out: Path, meshes) -> None:
    """The real SFT step (train.step.make_train_step: chunked loss, 2 accumulated micro-batches, the run's
    optimiser with its state from train.run_setup.init_state) on each mesh against one device: loss,
    the step's gradients (with_grads), updated LoRA parameters; plus logits of a forward pass."""
    _setup(8)
    import jax
    from flax import nnx

    import fxjax
    from fxjax import device_mesh, partition_rules
    from fxjax.model.lora import BASE_PARAMS, LoRAConfig
    from fxjax.train.batching import batch_shardings, build_step_batch, place_batch
    from fxjax.train.optimizer import make_optimizer
    from fxjax.train.run_setup import init_state
    from fxjax.train.step import OnMesh, TrainState, make_train_step, split_model
    from fxjax.config_sections import OptimSection

    assert jax.device_count() == 8, jax.devices()
    forward = _functions()
    t0 = time.time()
    loss_chunk = 40  # supervised tokens per lm_head chunk: several chunks per micro-batch

    def run(mesh):
        model = fxjax.from_pretrained(checkpoint, dtype="float32", mesh=mesh)
        fxjax.apply_lora(model, LoRAConfig(**LORA_KW))  # attached after loading: placed on the weights' mesh
        placement = [] if mesh is None else shard_report(model, mesh)["bad"]
        _set_lora_b(model)
        model.train()
        graphdef, params, base, rest = split_model(model)
        before = _flat_host(params)
        tx, schedule = make_optimizer(OptimSection(learning_rate=LR, warmup_steps=0, weight_decay=0.01), 10)
        micro = micro_batches()
        # on a mesh: images packed per batch shard (each device encodes only its rows' images)
        shards = 1 if mesh is None else device_mesh.batch_shards(mesh)
        host = build_step_batch(micro, model.config, pad_id=0, batch_shards=shards)
        kw = dict(loss_chunk=loss_chunk, remat=None, remat_vision=None, with_grads=True)
        if mesh is None:
            state = TrainState.fresh(params, tx, seed=0)
            step_fn = make_train_step(graphdef, tx, schedule, **kw)
            placed = jax.device_put(host)
        else:
            state, sh = init_state(params, base, rest, tx, seed=0, mesh=mesh)
            batch_sh = batch_shardings(host, mesh)
            placed = place_batch(host, batch_sh)
            step_fn = make_train_step(graphdef, tx, schedule, state_shardings=sh.state, base_shardings=sh.base,
                                      rest_shardings=sh.rest, batch_shardings=batch_sh, **kw)
            assert isinstance(step_fn, OnMesh)
        # logits of micro-batch 0 under the mesh: activations' batch pinned to (data, fsdp), vision per shard
        inputs = _host_inputs(model, micro[0], None if mesh is None else shards)
        with device_mesh.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            logits = forward(model, device_mesh.shard_inputs(inputs, mesh) if mesh is not None else inputs)
        state, metrics = step_fn(state, base, rest, placed)  # the state is donated
        nnx.update(model, state.params)
        got = dict(logits=np.asarray(logits), logits_sharding=str(logits.sharding), before=before,
                   placement=placement, loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]), finite=bool(metrics["finite"]),
                   grads=_flat_host(metrics["grads"]), stepped=_flat_host(state.params))
        if mesh is not None:
            got["loss_collectives"] = _loss_collectives(model, placed, mesh, loss_chunk)
            got.update(_opt_report(state.opt_state, state.params))
            patches = placed.inputs.vision.patches  # [A, S, P_s, patch_dim]
            got.update(vision_shape=list(patches.shape), vision_spec=str(patches.sharding.spec),
                       vision_shard_shapes=sorted({tuple(x.data.shape) for x in patches.addressable_shards}))
            rules = dict(nnx.to_flat_state(sh.state.params))
            got["grads_drift"] = [partition_rules.path_str(k) for k, g in nnx.to_flat_state(metrics["grads"])
                                  if not g.get_value().sharding.is_equivalent_to(rules[k], g.get_value().ndim)]
        return model, got

    ref_model, ref = run(None)
    base_total = sum(partition_rules.device_bytes(ref_model, BASE_PARAMS).values())
    results = dict(reference_seconds=time.time() - t0, base_bytes_total=base_total,
                   lora_params=len(ref["grads"]), meshes={}, reference_finite=ref["finite"],
                   reference_grad_norm=ref["grad_norm"],
                   reference_step_changed=sum(not np.array_equal(ref["before"][k], ref["stepped"][k])
                                              for k in ref["stepped"]),
                   reference_grad_nonzero=sum(bool(np.any(g)) for g in ref["grads"].values()),
                   reference_step_min_rel=min(rel(ref["stepped"][k], ref["before"][k]) for k in ref["stepped"]),
                   reference_decode=decode_report(ref_model, None, batch(1)))
    for shape in meshes:
        t = time.time()
        mesh = device_mesh.make_mesh(device_mesh.MeshConfig(*shape))
        model, got = run(mesh)
        report = shard_report(model, mesh)
        grad_errs = {k: rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]}
        step_errs = {k: rel(got["stepped"][k], ref["stepped"][k]) for k in ref["stepped"]}
        entry = dict(
            logits_rel=rel(got["logits"], ref["logits"]),
            loss_rel=abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
            grad_norm_rel=abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
            grad_rel=max(grad_errs.values()), grad_worst=max(grad_errs, key=grad_errs.get),  # the worst: to debug
            grad_keys_match=sorted(got["grads"]) == sorted(ref["grads"]),
            step_rel=max(step_errs.values()), step_worst=max(step_errs, key=step_errs.get),
            # the LoRA parameters keep their rule's sharding through the jitted step
            sharding_drift=_drift(model, mesh) + got["grads_drift"], logits_sharding=got["logits_sharding"],
            **{k: got[k] for k in ("opt_mirrored", "opt_mismatch", "opt_bytes_total", "opt_bytes_per_device",
                                   "vision_shape", "vision_spec", "vision_shard_shapes", "placement",
                                   "loss_collectives")},
            **report)
        if shape in DECODE_MESHES:  # the stepped model decoding, as GRPO's rollout and the evaluation do
            entry["decode"] = decode_report(model, mesh, batch(1))
        if shape == (2, 2, 2):  # export from the sharded model: one tensor gathered at a time
            export = out.parent / "export_222"
            from fxjax.model.lora import remove_lora
            remove_lora(model)
            fxjax.save_pretrained(model, export)
            entry["export_mismatch"] = _compare_checkpoints(checkpoint, export)
        entry["seconds"] = time.time() - t
        results["meshes"][",".join(map(str, shape))] = entry
        print(shape, json.dumps({k: v for k, v in entry.items() if k not in ("bad",)}), flush=True)
    # the decoder layers stacked and scanned (model.scan_layers): the layer loop is a while loop inside the
    # decode loop, whose body gathered each layer's weights for every token
    mesh = device_mesh.make_mesh(device_mesh.MeshConfig(1, 8, 1))
    results["decode_scan"] = decode_report(fxjax.from_pretrained(checkpoint, mesh=mesh, scan_layers=True), mesh, batch(1))
    results["decode_scan_reference"] = decode_report(fxjax.from_pretrained(checkpoint), None, batch(1))
    results["init"] = check_sharded_init(checkpoint)
    results["total_seconds"] = time.time() - t0
    out.write_text(json.dumps(results, indent=1))


def check_sharded_init(checkpoint: Path) -> dict:
    """The sharded random init (what init_model(cfg, mesh=) runs) is laid out by the rules, draws the values
    the unsharded init draws (not other values per shard), and with fsdp = 8 its compiled per-device output
    (memory_analysis) matches the live per-device bytes."""
    from flax import nnx

    from fxjax import device_mesh, partition_rules
    from fxjax.hf_config import load_config
    from fxjax.model import Qwen25VL

    cfg, _ = load_config(Path(checkpoint))
    out = {}
    for shape in ((1, 8, 1),):
        mesh = device_mesh.make_mesh(device_mesh.MeshConfig(*shape))
        build = lambda: Qwen25VL(cfg, rngs=nnx.Rngs(3))  # noqa: E731
        graphdef, compiled = partition_rules.compile_sharded_init(build, mesh)
        model = nnx.merge(graphdef, compiled())
        live = partition_rules.device_bytes(model, nnx.Param)
        report = shard_report(model, mesh)
        values = _flat_host(nnx.state(model, nnx.Param))
        eager = _flat_host(nnx.state(build(), nnx.Param))  # the same seed built unsharded, on one device
        out[",".join(map(str, shape))] = dict(
            same_names=sorted(values) == sorted(eager),
            max_diff_to_unsharded=max(float(np.abs(values[k] - eager[k]).max()) for k in values if k in eager),
            bad=report["bad"], split=report["split"], live_max=max(live.values()), live_min=min(live.values()),
            compiled_output_bytes=int(compiled.memory_analysis().output_size_in_bytes),
            abstract_bytes=partition_rules.shard_bytes(model, mesh, nnx.Param),
            total_bytes=sum(v.nbytes for v in values.values()),
            finite=all(bool(np.isfinite(v).all()) for v in values.values()),
            kernel_std=float(np.std(values["decoder/layers/0/mlp/gate_proj/kernel"])))
    return out


def _compare_checkpoints(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ (or exist in one only) between two checkpoint directories."""
    from fxjax.hf_checkpoint import iter_tensors, weight_files

    left = {name: t for name, _, t in iter_tensors(weight_files(Path(a)))}
    right = {name: t for name, _, t in iter_tensors(weight_files(Path(b)))}
    bad = sorted(set(left) ^ set(right))
    bad += [n for n in sorted(set(left) & set(right)) if not np.array_equal(left[n], right[n])]
    return bad


def _count_checkpoint_reads() -> list[int]:
    """The bytes each read of a checkpoint's tensor data returns from here on (a list the caller clears)."""
    from fxjax.hf_checkpoint import StoredTensor

    counted: list[int] = []
    read = StoredTensor._read

    def counting_read(self, index):
        region = read(self, index)
        counted.append(region.nbytes)
        return region

    StoredTensor._read = counting_read
    return counted


def run_multihost(checkpoint: Path, out: Path, meshes) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    import dataclasses

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from fxjax import distributed, host_exchange

    cfg = distributed.initialize()  # everything from the FXJAX_* environment variables
    import fxjax
    from fxjax import device_mesh, partition_rules
    from fxjax.model.lora import BASE_PARAMS

    forward = _functions()
    rank = jax.process_index()
    data = batch()
    read_bytes = _count_checkpoint_reads()
    info = dict(process_index=rank, process_count=jax.process_count(), device_count=jax.device_count(),
                local_device_count=jax.local_device_count(), config=dataclasses.asdict(cfg), meshes={})
    for i, shape in enumerate(meshes):
        mesh = device_mesh.make_mesh(device_mesh.MeshConfig(*shape))
        read_bytes.clear()
        model = fxjax.from_pretrained(checkpoint, dtype="float32", mesh=mesh)
        checkpoint_read_bytes = sum(read_bytes)
        with device_mesh.use_mesh(mesh):  # images packed per batch shard, each process placing its shards
            logits = forward(model, device_mesh.shard_inputs(_host_inputs(model, data, device_mesh.batch_shards(mesh)), mesh))
        full = device_mesh.gather(logits)
        local = partition_rules.device_bytes(model, BASE_PARAMS)
        report = shard_report(model, mesh)
        key = ",".join(map(str, shape))
        held, part_equal = _local_part_check(model, data, mesh)
        info["meshes"][key] = dict(local_devices=len(local), local_base_bytes=sum(local.values()),
                                   checkpoint_read_bytes=checkpoint_read_bytes,
                                   logits_fully_addressable=bool(logits.is_fully_addressable),
                                   bad=report["bad"], split=report["split"], total=report["total"],
                                   batch_shards_held=list(held), local_part_equal=part_equal)
        np.save(out / f"logits_{key.replace(',', '')}_{rank}.npy", full)
        if i == 0:  # export from the model spread over both processes; process 0 writes
            from fxjax import hf_save

            converted, to_hf = [], hf_save.to_hf
            hf_save.to_hf = lambda *args: (converted.append(1), to_hf(*args))[1]
            fxjax.save_pretrained(model, out / "export")
            hf_save.to_hf = to_hf
            info["export_tensors_converted"] = len(converted)
    # the host-side exchange SFT agrees batch sizes and saves iterator states with (over the real store)
    info["gathered"] = [host_exchange.allgather_json("worker-test", {"rank": rank, "call": c}) for c in range(3)]
    # and the one to process 0 only (GRPO's completions): the others get None and do not wait
    info["gathered_to_main"] = [host_exchange.gather_json_to_main("worker-main", {"rank": rank, "call": c})
                                for c in range(3)]
    (out / f"info_{rank}.json").write_text(json.dumps(info, default=str))
    distributed.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("meshes")
    m.add_argument("checkpoint", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--meshes", nargs="*", default=[",".join(map(str, s)) for s in MESHES])
    h = sub.add_parser("multihost")
    h.add_argument("checkpoint", type=Path)
    h.add_argument("out", type=Path)
    h.add_argument("--meshes", nargs="*", default=["1,8,1", "2,2,2"])
    b = sub.add_parser("build")
    b.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.mode == "meshes":
        run_meshes(args.checkpoint, args.out, [tuple(int(x) for x in s.split(",")) for s in args.meshes])
    elif args.mode == "multihost":
        run_multihost(args.checkpoint, args.out, [tuple(int(x) for x in s.split(",")) for s in args.meshes])
    else:
        build_checkpoint(args.directory)


if __name__ == "__main__":
    main()
