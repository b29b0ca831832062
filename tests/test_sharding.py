"""Sharding: partition rules, meshes, sharded loading / init / export, and parity with one device.

The multi-device checks run in ONE subprocess (tests/sharding_worker.py) with 8 simulated CPU devices
(jax_num_cpu_devices must be set before JAX's backend starts, which this pytest process has already
done). It loads a tiny HF checkpoint whose sharded dimensions all divide by 8 onto the meshes
(data, fsdp, tensor) = (1,8,1), (1,1,8), (2,2,2), (1,2,4) (fsdp and tensor alone, all three together, the
two model axes together; data alone, the plainest layout, is what the two-process SFT and GRPO tests run over processes), runs
the real SFT step of train.step there (chunked loss, 2 accumulated micro-batches with images of four sizes
packed per batch shard, the run's optimiser and state shardings) and compares loss, LoRA gradients, updated
LoRA parameters and logits with one device (whose images are one packed sequence).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sharding_worker as worker
from fxjax import device_mesh, distributed, partition_rules
from fxjax.presets import load_preset
from fxjax.device_mesh import MeshConfig, ShardingError
from fxjax.model import Qwen25VL
from fxjax.model.lora import LoRAConfig, apply_lora

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
WORKER_TIMEOUT = 600


# ---- rules, specs and configs (in this process, from shapes alone) ---------------------------------

def abstract_model(preset: str, lora: LoRAConfig | None = None, layers: int | None = 2) -> Qwen25VL:
    """A preset's model from shapes alone; `layers` shortens both stacks (every kind of parameter stays)."""
    cfg = load_preset(preset)
    if layers is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=layers),
                          vision=dataclasses.replace(cfg.vision, depth=layers, fullatt_block_indexes=(layers - 1,)))

    def build():
        model = Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype="bfloat16")
        if lora is not None:
            apply_lora(model, lora, rngs=nnx.Rngs(1))
        return model

    return nnx.eval_shape(build)


@pytest.fixture(scope="module")
def abstract_7b():
    return abstract_model("7b", LoRAConfig(rank=8, alpha=32.0, dropout=0.05))


def test_every_parameter_of_every_preset_has_a_rule():
    for preset in ("tiny", "3b", "7b", "32b", "72b"):
        model = abstract_model(preset)
        specs = dict(nnx.to_flat_state(partition_rules.partition_specs(model, MeshConfig(1, 8, 8))))
        params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        assert set(params) <= set(specs)


def test_rules_shard_big_weights_megatron_style():
    spec = partition_rules.logical_spec
    assert spec("decoder/layers/3/self_attn/q_proj/kernel") == P("fsdp", "tensor")
    assert spec("decoder/layers/3/self_attn/k_proj/bias") == P("tensor")
    assert spec("decoder/layers/3/self_attn/o_proj/kernel") == P("tensor", "fsdp")
    assert spec("decoder/layers/0/mlp/up_proj/kernel") == P("fsdp", "tensor")
    assert spec("decoder/layers/0/mlp/down_proj/kernel") == P("tensor", "fsdp")
    assert spec("visual/blocks/31/attn/qkv/kernel") == P("fsdp", "tensor")
    assert spec("visual/blocks/31/attn/proj/kernel") == P("tensor", "fsdp")
    assert spec("visual/merger/fc1/kernel") == P("fsdp", "tensor")
    assert spec("visual/merger/fc2/kernel") == P("tensor", "fsdp")
    assert spec("embed_tokens/embedding") == P("tensor", "fsdp")
    assert spec("lm_head/kernel") == P("fsdp", "tensor")
    assert spec("decoder/layers/0/input_layernorm/weight") == P()
    assert spec("visual/blocks/0/attn/proj/bias") == P()
    # each bias goes with its kernel: split over "tensor" where the kernel's outputs are (column-parallel),
    # whole where they are summed over "tensor" (row-parallel)
    for linear in ("visual/blocks/0/attn/qkv", "visual/blocks/0/attn/proj", "visual/blocks/0/mlp/gate_proj",
                   "visual/blocks/0/mlp/up_proj", "visual/blocks/0/mlp/down_proj", "visual/merger/fc1",
                   "visual/merger/fc2", "decoder/layers/0/self_attn/q_proj", "decoder/layers/0/self_attn/k_proj",
                   "decoder/layers/0/self_attn/v_proj"):
        column = spec(f"{linear}/kernel") == P("fsdp", "tensor")
        assert column or spec(f"{linear}/kernel") == P("tensor", "fsdp"), linear
        assert spec(f"{linear}/bias") == (P("tensor") if column else P()), linear


def test_a_tensor_axis_that_splits_heads_is_said_with_one_that_does_not():
    """mesh.tensor 4 on the 3B (2 key/value heads) split each head's keys and values over devices, and the
    KV-cache attention then copied them whole every step, without a word but XLA's C++ warning."""
    from fxjax.presets import load_preset

    config = load_preset("3b")  # 16 heads, 2 key/value heads, vision 16 heads
    assert partition_rules.split_heads_message(config, MeshConfig(2, 2, 2)) is None
    assert partition_rules.split_heads_message(config, MeshConfig(1, 8, 1)) is None
    assert partition_rules.split_heads_message(config, MeshConfig(1, 2, 4)) == (
        "mesh.tensor=4 does not divide the decoder's 2 key/value heads, so heads are split across devices and "
        "attention over the KV cache copies them whole to every device each step (right numbers, slower); "
        "mesh.tensor=2 keeps every head whole (the other devices on fsdp or data)")


def test_unknown_parameter_is_an_error_not_replicated():
    with pytest.raises(ShardingError, match="no partition rule for parameter 'decoder/layers/0/new_thing/kernel'"):
        partition_rules.logical_spec("decoder/layers/0/new_thing/kernel")

    class Extra(nnx.Module):
        def __init__(self):
            self.big = nnx.Param(jnp.zeros((1024, 1024)))

    with pytest.raises(ShardingError, match="'big'"):
        partition_rules.partition_specs(Extra(), MeshConfig(1, 8, 1))


def test_lora_factors_follow_their_base_plus_fsdp_with_rank_replicated(abstract_7b):
    sizes = MeshConfig(2, 2, 2)
    base = "decoder/layers/0/self_attn/q_proj"
    assert partition_rules.param_spec(f"{base}/lora/lora_a", (3584, 8), sizes) == P("fsdp")  # [in, r]
    assert partition_rules.param_spec(f"{base}/lora/lora_b", (8, 3584), sizes) == P(None, ("tensor", "fsdp"))  # [r, out]
    row = "decoder/layers/0/mlp/down_proj"
    assert partition_rules.param_spec(f"{row}/lora/lora_a", (18944, 8), sizes) == P(("tensor", "fsdp"))
    assert partition_rules.param_spec(f"{row}/lora/lora_b", (8, 3584), sizes) == P(None, "fsdp")
    # without fsdp: the base's entry alone; where fsdp does not divide on top of tensor, the rank takes it
    assert partition_rules.param_spec(f"{base}/lora/lora_b", (8, 3584), MeshConfig(1, 1, 8)) == P(None, "tensor")
    assert partition_rules.param_spec(f"{base}/lora/lora_b", (8, 6), MeshConfig(1, 4, 2)) == P("fsdp", "tensor")
    assert partition_rules.param_spec(f"{base}/lora/lora_b", (6, 6), MeshConfig(1, 4, 2)) == P(None, "tensor")
    specs = dict(nnx.to_flat_state(partition_rules.partition_specs(abstract_7b, sizes)))
    loras = [(p, s) for p, s in specs.items() if p[-2:] in (("lora", "lora_a"), ("lora", "lora_b"))]
    assert len(loras) == 2 * (2 * 7 + 2 * 5 + 2)  # all-linear: decoder 7, vision 5 per block, merger 2
    for path, spec in loras:
        base_spec = specs[path[:-2] + ("kernel",)]
        entries = list(base_spec) + [None, None]
        shared = entries[0] if path[-1] == "lora_a" else entries[1]
        axes = () if shared is None else (shared,) if isinstance(shared, str) else tuple(shared)
        entry = axes if "fsdp" in axes else axes + ("fsdp",)  # every 7B LoRA dimension divides
        entry = entry[0] if len(entry) == 1 else entry
        want = P(entry) if path[-1] == "lora_a" else P(None, entry)
        assert spec == want, (path, spec, base_spec)
    rng_state = [s for p, s in specs.items() if "rngs" in p]  # LoRA dropout's RNG state: replicated
    assert rng_state and all(s == P() for s in rng_state)


def test_indivisible_dims_are_replicated_and_reported(abstract_7b):
    assert partition_rules.replicated_dims(abstract_7b, MeshConfig(1, 8, 1)) == []
    dropped = partition_rules.replicated_dims(abstract_7b, MeshConfig(1, 8, 8))
    # the vision MLP width 3420 is not a multiple of 8 (28 heads of 128 split evenly by columns)
    assert dropped and {d.size for d in dropped} == {3420}
    assert all(d.axes == ("tensor",) and d.axes_size == 8 for d in dropped)
    spec = partition_rules.param_spec("visual/blocks/0/mlp/gate_proj/kernel", (1280, 3420), MeshConfig(1, 8, 8))
    assert spec == P("fsdp")
    # what a run prints (train.run_setup.warn_replicated): grouped, with an example name
    summary = partition_rules.replicated_summary(dropped)
    assert summary.startswith(f"{len(dropped)} parameter(s) of dim 3420 not divisible by tensor = 8 (e.g. ")
    assert partition_rules.replicated_summary([]) == ""
    with pytest.warns(partition_rules.UnsplitParametersWarning, match=r"leaves parameters unsplit: .* tensor = 8"):
        partition_rules.warn_unsplit(abstract_7b, MeshConfig(1, 8, 8))  # what from_pretrained(mesh=) says
    tiny = abstract_model("tiny")  # hidden 64, vocab 151936: fsdp 3 divides nothing but the vocab
    names = {d.path for d in partition_rules.replicated_dims(tiny, {"fsdp": 3})}
    assert "decoder/layers/0/mlp/gate_proj/kernel" in names


def test_mesh_config_sizes_and_errors():
    assert MeshConfig(2, -1, 2).resolve(8) == MeshConfig(2, 2, 2)
    assert MeshConfig.from_dict({"fsdp": 4, "tensor": 2}).shape == (1, 4, 2)
    with pytest.raises(ShardingError, match=r"data=2 x fsdp=2 x tensor=2 = 8 devices, but 1 device\(s\)"):
        MeshConfig(2, 2, 2).resolve(1)
    with pytest.raises(ShardingError, match="unknown mesh axis"):
        MeshConfig.from_dict({"model": 2})
    with pytest.raises(ShardingError, match="at most one"):
        MeshConfig(-1, -1, 1).resolve(8)
    mesh = device_mesh.make_mesh(MeshConfig())  # this process has one device
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)
    assert device_mesh.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)


def test_7b_per_device_bytes_fall_as_one_over_fsdp():
    spec = importlib.util.spec_from_file_location("sharding_memory", REPO / "bench" / "sharding_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [r for r in bench.abstract("7b") if "tensor" not in r]
    total = rows[0]["total"]
    assert 15 * 2**30 < total < 16 * 2**30  # 8.3 B parameters in bf16
    for row in rows:
        share = row["abstract"] / total
        assert 1 / row["fsdp"] <= share <= 1.01 / row["fsdp"], row


def test_allgather_json_orders_by_process_and_stops_when_cancelled_or_timed_out(monkeypatch):
    """The host-side exchange the processes agree on batch sizes and save iterator states with, against a fake
    key-value store standing in for process 1 of 2."""
    import jax
    from jax._src.distributed import global_state

    from fxjax import host_exchange

    class Store:
        def __init__(self):
            self.kv, self.deleted = {}, []

        def key_value_set(self, key, value):
            self.kv[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            if key in self.kv:
                return self.kv[key]
            raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")

        def key_value_dir_get(self, key):
            return sorted((k, v) for k, v in self.kv.items() if k.startswith(key.rstrip("/") + "/"))

        def key_value_delete(self, key):
            self.deleted.append(key)

    store = Store()
    monkeypatch.setattr(global_state, "client", store)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(host_exchange, "_GATHERS", {})
    for call in range(3):
        store.kv[f"fxjax/shape/{call}/1"] = f'{{"n": {10 + call}}}'  # process 1's answer
        assert host_exchange.allgather_json("shape", {"n": call}) == [{"n": call}, {"n": 10 + call}]
    assert store.deleted == ["fxjax/shape/0/0"]  # keys every process has read are dropped
    with pytest.raises(host_exchange.GatherCancelled, match="fxjax/shape/3/1"):
        host_exchange.allgather_json("shape", 1, cancelled=lambda: True)
    with pytest.raises(host_exchange.DistributedError, match="no process wrote fxjax/shape/4/1 within 1 s"):
        host_exchange.allgather_json("shape", 1, timeout_s=1)
    store.blocking_key_value_get = lambda key, ms: (_ for _ in ()).throw(RuntimeError("UNAVAILABLE: gone"))
    with pytest.raises(RuntimeError, match="UNAVAILABLE"):
        host_exchange.allgather_json("shape", 1)


def test_an_exchange_reads_every_part_in_a_few_requests(monkeypatch):
    """Each process read the other processes' parts one blocking get at a time: 64 requests per process and
    4,096 at the coordinator for an exchange on a 64-host pod, several exchanges a step. Now one listing of
    the call's keys when all have arrived, and a wait for the first missing one otherwise, then another
    listing for small parts, the other missing ones one by one for large ones (a fake store for process 0 of
    64; the real one under tests/test_multihost.py)."""
    import jax
    from jax._src.distributed import global_state

    from fxjax import host_exchange

    class Store:
        def __init__(self):
            self.kv, self.requests, self.late = {}, [], {}

        def key_value_set(self, key, value):
            self.kv[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            self.requests.append(("get", key))
            self.kv.update(self.late)  # (the late processes arrive while this one waits)
            return self.kv[key]

        def key_value_dir_get(self, key):
            self.requests.append(("list", key))
            return sorted((k, v) for k, v in self.kv.items() if k.startswith(key + "/"))

        def key_value_delete(self, key):
            self.kv.pop(key, None)

    store = Store()
    monkeypatch.setattr(global_state, "client", store)
    monkeypatch.setattr(jax, "process_count", lambda: 64)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(host_exchange, "_GATHERS", {})
    store.kv.update({f"fxjax/sizes/0/{p}": str(p) for p in range(1, 64)})  # all there already
    assert host_exchange.allgather_json("sizes", 0) == list(range(64))
    assert store.requests == [("list", "fxjax/sizes/0")]
    store.requests.clear()
    store.kv.update({f"fxjax/sizes/1/{p}": str(p) for p in range(1, 40)})
    store.late = {f"fxjax/sizes/1/{p}": str(p) for p in range(40, 64)}  # 24 processes not there yet
    assert host_exchange.allgather_json("sizes", 0) == list(range(64))
    assert store.requests == [("list", "fxjax/sizes/1"), ("get", "fxjax/sizes/1/40"), ("list", "fxjax/sizes/1")]
    # large parts (a run's images' sizes): after the first listing the missing ones one by one, not listings
    # that fetch every part again
    store.requests.clear()
    big = "x" * (host_exchange._RELIST_BYTES + 1)
    store.kv.update({f"fxjax/sizes/2/{p}": f'"{big}"' for p in range(1, 61)})
    store.late = {f"fxjax/sizes/2/{p}": f'"{big}"' for p in range(61, 64)}
    assert host_exchange.allgather_json("sizes", big) == [big] * 64
    assert store.requests == [("list", "fxjax/sizes/2")] + [("get", f"fxjax/sizes/2/{p}") for p in (61, 62, 63)]


def test_gather_json_to_main_reads_at_process_0_only_and_drops_what_it_read(monkeypatch):
    """What only process 0 writes (GRPO's completions) goes to it alone: process 0 reads every part and deletes
    them; another process writes its part and returns None without reading anyone's (against a fake store)."""
    import jax
    from jax._src.distributed import global_state

    from fxjax import host_exchange

    class Store:
        def __init__(self):
            self.kv, self.deleted, self.read = {}, [], []

        def key_value_set(self, key, value):
            self.kv[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            self.read.append(key)
            return self.kv[key]

        def key_value_dir_get(self, key):
            self.read.append(key)
            return sorted((k, v) for k, v in self.kv.items() if k.startswith(key.rstrip("/") + "/"))

        def key_value_delete(self, key):
            self.deleted.append(key)
            del self.kv[key]

    store = Store()
    monkeypatch.setattr(global_state, "client", store)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(host_exchange, "_GATHERS", {})
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    for call in range(2):  # process 1 runs ahead: nothing to wait for
        assert host_exchange.gather_json_to_main("rows", {"n": 10 + call}) is None
    assert store.kv == {"fxjax/rows/0/1": '{"n": 10}', "fxjax/rows/1/1": '{"n": 11}'} and store.read == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(host_exchange, "_GATHERS", {})
    for call in range(2):
        assert host_exchange.gather_json_to_main("rows", {"n": call}) == [{"n": call}, {"n": 10 + call}]
    assert store.deleted == ["fxjax/rows/0/0", "fxjax/rows/0/1", "fxjax/rows/1/0", "fxjax/rows/1/1"]
    assert store.kv == {}  # every part read once, then dropped


def test_distributed_settings_from_env_and_arguments(monkeypatch):
    env = {"FXJAX_COORDINATOR": "10.0.0.1:1234", "FXJAX_NUM_PROCESSES": "4", "FXJAX_PROCESS_ID": "3"}
    cfg = distributed.DistributedConfig.from_env(env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.DistributedConfig.from_env(jax_env).num_processes == 2
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.resolve(process_id=1).process_id == 1  # arguments beat the environment
    assert distributed.resolve({"num_processes": 2, "process_id": 1}).num_processes == 2  # so does config
    with pytest.raises(distributed.DistributedError, match="process_id 5 is not in"):
        distributed.resolve(process_id=5)
    monkeypatch.delenv("FXJAX_PROCESS_ID")
    with pytest.raises(distributed.DistributedError, match="FXJAX_PROCESS_ID"):
        distributed.resolve()
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.DistributedConfig.from_env({"FXJAX_NUM_PROCESSES": "two"})
    # a coordinator or process id without a count: every process would run alone (explicit settings skip
    # cluster detection), so it is an error
    monkeypatch.delenv("FXJAX_NUM_PROCESSES")
    with pytest.raises(distributed.DistributedError, match=r"coordinator_address \(FXJAX_COORDINATOR\) set "
                                                           r"without num_processes \(FXJAX_NUM_PROCESSES\)"):
        distributed.resolve()
    with pytest.raises(distributed.DistributedError, match=r"\(FXJAX_COORDINATOR\) and process_id \(FXJAX_PROC"):
        distributed.resolve(process_id=0)
    assert distributed.resolve(num_processes=1).num_processes == 1  # one process, said so: fine
    for key in env:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.initialize().multi_process  # one process: nothing to start
    assert not jax.distributed.is_initialized()
    distributed.initialize(local_device_count=jax.local_device_count())  # already so: fine
    said: list[str] = []  # the config's count replaces XLA_FLAGS' own: said (it was silent)
    distributed.initialize(local_device_count=jax.local_device_count(), log=said.append,
                           environ={"XLA_FLAGS": f"--xla_force_host_platform_device_count={jax.local_device_count() + 7}"})
    assert said[0] == (f"note: distributed.local_device_count={jax.local_device_count()} (or FXJAX_LOCAL_DEVICE_COUNT) "
                    f"replaces XLA_FLAGS' --xla_force_host_platform_device_count={jax.local_device_count() + 7}: "
                    f"{jax.local_device_count()} CPU device(s) a process")
    with pytest.raises(distributed.DistributedError, match="before JAX starts its backends"):
        distributed.initialize(local_device_count=jax.local_device_count() + 3)


def test_single_device_mesh_load_matches_plain_load(tmp_path):
    """from_pretrained(mesh=) on this process's single device: same values, rule shardings."""
    ckpt = worker.build_checkpoint(tmp_path / "ckpt")
    import fxjax

    mesh = device_mesh.make_mesh(MeshConfig())
    a = fxjax.from_pretrained(ckpt, mesh=mesh)
    b = fxjax.from_pretrained(ckpt)
    left, right = nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))
    assert [p for p, _ in left] == [p for p, _ in right] and len(left) > 0
    for (path, x), (_, y) in zip(left, right):
        assert np.array_equal(np.asarray(x[...]), np.asarray(y[...])), path
        assert x[...].sharding.mesh.axis_names == ("data", "fsdp", "tensor")


# ---- 8 simulated devices, one subprocess ----------------------------------------------------------

@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("sharding")
    ckpt = worker.build_checkpoint(work / "ckpt")
    out = work / "results.json"
    proc = subprocess.run([sys.executable, str(Path(worker.__file__)), "meshes", str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    if proc.returncode:
        pytest.fail(f"sharding worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {**json.loads(out.read_text()), "stderr": proc.stderr}


MESH_KEYS = [",".join(map(str, m)) for m in worker.MESHES]


@pytest.mark.parametrize("mesh", MESH_KEYS)
def test_mesh_logits_and_lora_gradients_match_one_device(mesh_results, mesh):
    """Gradients: the real step's own (train.step.make_train_step with_grads: 2 accumulated micro-batches,
    chunked loss), before clipping."""
    r = mesh_results["meshes"][mesh]
    assert r["logits_rel"] <= TOL, r["logits_rel"]
    assert r["grad_keys_match"] and mesh_results["lora_params"] > 0
    assert r["grad_rel"] <= TOL, r["grad_rel"]
    assert r["grad_norm_rel"] <= TOL
    assert mesh_results["reference_grad_nonzero"] == mesh_results["lora_params"]


@pytest.mark.parametrize("mesh", MESH_KEYS)
def test_mesh_real_sft_step_matches_one_device(mesh_results, mesh):
    """train.step's SFT step (the run's optimiser: clipping + AdamW with weight decay; its state from
    train.run_setup.init_state) on the mesh: loss and updated LoRA parameters as on one device."""
    r = mesh_results["meshes"][mesh]
    assert mesh_results["reference_finite"]
    assert r["loss_rel"] <= TOL, r["loss_rel"]
    assert mesh_results["reference_step_changed"] == mesh_results["lora_params"]
    assert mesh_results["reference_step_min_rel"] > 10 * TOL  # the step moves every parameter visibly
    assert r["step_rel"] <= TOL, r["step_rel"]
    assert r["sharding_drift"] == []  # params and gradients keep the rules' layout through jit


@pytest.mark.parametrize("mesh", MESH_KEYS)
def test_each_device_scores_only_its_own_rows_targets(mesh_results, mesh):
    """The chunked loss under the mesh (several chunks per micro-batch): the gradient with respect to the
    hidden states has no collective, so each device gathers and runs the lm_head on its own rows' targets
    only (a gather over the flattened global batch all-gathered them and every device computed every
    chunk's logits)."""
    assert mesh_results["meshes"][mesh]["loss_collectives"] == []


@pytest.mark.parametrize("mesh", MESH_KEYS)
def test_optimizer_state_has_the_lora_shardings(mesh_results, mesh):
    """Adam's mu and nu leaves carry their LoRA parameter's sharding (no replicated flat vector), so per
    device the optimiser state shrinks with fsdp x tensor like the LoRA parameters."""
    r = mesh_results["meshes"][mesh]
    data, fsdp, tensor = map(int, mesh.split(","))
    assert r["opt_mismatch"] == [], r["opt_mismatch"][:5]
    assert r["opt_mirrored"] == 2 * mesh_results["lora_params"]  # mu and nu of every LoRA parameter
    per_device, total = max(r["opt_bytes_per_device"]), r["opt_bytes_total"]
    if fsdp == 8:  # every LoRA factor splits over fsdp: ~1/8 per device (plus the replicated step counts)
        assert per_device <= 1.05 * total / 8 + 64, (per_device, total)
    if fsdp * tensor == 1:
        assert per_device == total
    else:
        assert per_device < 0.6 * total


@pytest.mark.parametrize("mesh", MESH_KEYS)
def test_mesh_parameters_really_split(mesh_results, mesh):
    r = mesh_results["meshes"][mesh]
    data, fsdp, tensor = map(int, mesh.split(","))
    assert r["bad"] == [], r["bad"][:5]  # every addressable shard has the shape its spec implies
    assert r["placement"] == [], r["placement"][:5]  # so right after fxjax.apply_lora on a loaded model
    assert r["replicated_dims"] == []
    if fsdp * tensor == 1:
        assert r["split"] == 0  # pure data parallel: every device holds a full replica
    else:
        assert r["split"] > 0 and r["lora_split"] > 0
    total = mesh_results["base_bytes_total"]
    per_device = r["base_bytes_per_device"]
    assert len(per_device) == 8 and max(per_device) <= 1.1 * total / (fsdp * tensor) + 2048, (per_device, total)


def test_no_mesh_makes_xla_replicate_an_activation(mesh_results):
    """With fsdp and tensor both > 1 XLA's propagation split the embedding lookup's rows and the merger's
    fc1 output over axes from which it reached the batch layout only by replicating the whole tensor (its
    "Involuntary full rematerialization" warning, on (2,2,2) and (1,2,4)); the model pins both layouts
    (model.batch_axis.vocab_parallel, shard_batch_and_features)."""
    lines = [line for line in mesh_results["stderr"].splitlines() if "Involuntary full rematerialization" in line]
    assert not lines, "\n".join(line[:600] for line in lines)


def test_batch_stays_sharded_over_data_and_fsdp(mesh_results):
    assert "spec=P('fsdp',)" in mesh_results["meshes"]["1,8,1"]["logits_sharding"]
    assert "spec=P(('data', 'fsdp'),)" in mesh_results["meshes"]["2,2,2"]["logits_sharding"]


@pytest.mark.parametrize("mesh", MESH_KEYS)
def test_vision_is_packed_per_batch_shard(mesh_results, mesh):
    """The step's vision arrays are built per batch shard ([A, S, P_s, ...], S = data x fsdp) and split over
    ("data", "fsdp"): a device holds (and encodes) only its own rows' images. With S = 1 (tensor only) they
    are one packed sequence [A, P, ...], replicated."""
    r = mesh_results["meshes"][mesh]
    data, fsdp, _ = map(int, mesh.split(","))
    shards = data * fsdp
    if shards == 1:
        assert len(r["vision_shape"]) == 3 and r["vision_spec"] == "P()"
        return
    accum, s, slots, patch_dim = r["vision_shape"]
    assert s == shards
    assert r["vision_spec"] == "P(None, ('data', 'fsdp'), None, None)"
    assert r["vision_shard_shapes"] == [[accum, 1, slots, patch_dim]]


@pytest.mark.parametrize("mesh", [",".join(map(str, m)) for m in worker.DECODE_MESHES] + ["1,8,1 scan_layers"])
def test_weights_gathered_for_decoding_leave_the_decode_loop_without_all_gathers(mesh_results, mesh):
    """fxjax.decode_weights (GRPO's rollout, the held-out evaluation): the weights split over fsdp, gathered
    once, decode the same greedy tokens as one device, and the compiled decode loop (the real sampler's
    rollout_jit) then holds no all-gather, where with the weights as placed it gathered in every token's
    iteration; the gathered copy holds no fsdp split while the model's own weights keep theirs."""
    if mesh.endswith("scan_layers"):  # a fresh load, layers stacked: its one-device tokens are a fresh load's
        r, want = mesh_results["decode_scan"], mesh_results["decode_scan_reference"]["sharded_tokens"]
    else:  # the model after the mesh's SFT step, against the one-device model after its step
        r, want = mesh_results["meshes"][mesh]["decode"], mesh_results["reference_decode"]["sharded_tokens"]
    assert len(want) == worker.BATCH and len(set(map(tuple, want))) > 4  # (rows that differ: a real decode)
    assert r["sharded_tokens"] == want and r["gathered_tokens"] == want
    assert r["sharded_loop_all_gathers"] > 0 and r["gathered_loop_all_gathers"] == 0
    assert r["gathered_specs_with_fsdp"] == [] and r["model_specs_with_fsdp"] > 10
    assert r["second_gather_compiles"] == 0  # (a fresh jit each call compiled it again at every rollout)


def test_export_from_sharded_model_is_bit_exact(mesh_results):
    assert mesh_results["meshes"]["2,2,2"]["export_mismatch"] == []


def test_sharded_random_init(mesh_results):
    """The sharded init (init_model(mesh=)) follows the rules and gives the unsharded init's values; with
    fsdp = 8 a device holds ~1/8 of the weights, by live buffers and by the compiled init's memory analysis."""
    r = mesh_results["init"]["1,8,1"]
    assert r["bad"] == [] and r["split"] > 0 and r["finite"]
    assert r["same_names"] and r["max_diff_to_unsharded"] <= 1e-6  # the eager build's values, gathered
    assert math.isclose(r["kernel_std"], 1 / math.sqrt(64), rel_tol=0.1)  # Linear init N(0, 1/in)
    assert r["live_max"] == r["live_min"] == r["abstract_bytes"]
    assert math.isclose(r["compiled_output_bytes"], r["live_max"], rel_tol=0.02)
    assert r["live_max"] <= 1.1 * r["total_bytes"] / 8 + 2048


def test_jitted_init_on_this_processs_mesh_equals_the_eager_init():
    """init_model(cfg, mesh=) runs the build under jit with out_shardings; on this process's one device the
    values are the eager ones (8 devices: test_sharded_random_init)."""
    from fxjax.model_init import init_model

    cfg = load_preset("tiny")  # with a small vocabulary: the 151,936-row embedding's init is most of the time
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=256))
    mesh = device_mesh.make_mesh(MeshConfig())
    a = nnx.to_flat_state(nnx.state(init_model(cfg, seed=5, mesh=mesh), nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(init_model(cfg, seed=5), nnx.Param)))
    assert {p for p, _ in a} == set(b)
    for path, x in a:
        assert x[...].sharding.spec == partition_rules.param_spec(path, x.shape, mesh)
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(b[path][...]), rtol=0, atol=1e-6)


def test_shard_model_places_lora_dropout_keys_replicated():
    """LoRA dropout streams are typed PRNG keys (no numpy form): shard_model moves their key data."""
    cfg = load_preset("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=1, vocab_size=256),
                      vision=dataclasses.replace(cfg.vision, depth=1, fullatt_block_indexes=(0,)))
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, dropout=0.1), rngs=nnx.Rngs(params=1, dropout=2))
    keys = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.RngKey))]
    assert keys, "dropout added no RNG stream"
    before = {p: np.asarray(jax.random.key_data(v.get_value())) for p, v in keys}
    mesh = device_mesh.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    partition_rules.shard_model(model, mesh)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.RngKey)):
        value = variable.get_value()
        assert jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
        assert value.sharding == jax.sharding.NamedSharding(mesh, P())
        assert np.array_equal(np.asarray(jax.random.key_data(value)), before[path])
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert isinstance(variable.get_value().sharding, jax.sharding.NamedSharding), path
