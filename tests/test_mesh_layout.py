"""Mesh layout (fxjax.device_mesh.device_grid / make_mesh) and cluster auto-detection (fxjax.distributed).

Device grids are checked over fake device objects (id, process_index, platform, slice_index): the layout
code only reads those attributes, and no test here needs several real devices or processes.
jax.distributed.initialize is replaced by a recorder; nothing joins a real cluster.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from fxjax import device_mesh, distributed
from fxjax.device_mesh import MeshConfig, ShardingError


def fake_devices(platform: str, processes: int, per_process: int, *, slices: int | None = None,
                 ids_reversed_by_process: bool = False):
    """Devices of `processes` processes, shuffled; process p's devices get ids p*per_process + i (or the
    last process the lowest ids), so process order and id order can disagree."""
    out = []
    for p in range(processes):
        base = (processes - 1 - p if ids_reversed_by_process else p) * per_process
        for i in range(per_process):
            attrs = dict(id=base + i, process_index=p, platform=platform, device_kind=f"fake-{platform}")
            if slices is not None:
                attrs["slice_index"] = p * slices // processes
            out.append(SimpleNamespace(**attrs))
    rng = np.random.default_rng(0)
    return [out[i] for i in rng.permutation(len(out))]


def ids(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.id, otypes=[int])(grid)


def procs(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index, otypes=[int])(grid)


# ---- CPU: the order is what it always was (process, then local id) ---------------------------------

@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (8, 1, 1), (2, 1, 4)])
def test_cpu_grid_keeps_process_then_local_order(shape):
    devices = fake_devices("cpu", 2, 4, ids_reversed_by_process=True)  # process 0 holds ids 4..7
    grid = device_mesh.device_grid(MeshConfig(*shape).resolve(8), devices)
    assert grid.shape == shape
    assert ids(grid).ravel().tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


def test_cpu_grid_keeps_fast_axes_inside_a_process():
    grid = device_mesh.device_grid(MeshConfig(data=2, fsdp=2, tensor=2).resolve(8), fake_devices("cpu", 2, 4))
    assert (procs(grid)[0] == 0).all() and (procs(grid)[1] == 1).all()


def test_make_mesh_on_this_process_devices():
    mesh = device_mesh.make_mesh(MeshConfig(data=-1))
    assert mesh.axis_names == device_mesh.AXES
    assert mesh.devices.shape == (jax.device_count(), 1, 1)
    assert mesh.devices.ravel().tolist() == sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3


# ---- accelerators: mesh_utils ----------------------------------------------------------------------

def test_gpu_grid_comes_from_mesh_utils(monkeypatch):
    calls = []
    real = device_mesh.mesh_utils.create_device_mesh

    def record(shape, devices, **kwargs):
        calls.append(tuple(shape))
        return real(shape, devices, **kwargs)

    monkeypatch.setattr(device_mesh.mesh_utils, "create_device_mesh", record)
    grid = device_mesh.device_grid(MeshConfig(data=2, fsdp=4).resolve(8),
                                fake_devices("gpu", 2, 4, ids_reversed_by_process=True))
    assert calls == [(2, 4, 1)]
    assert ids(grid).ravel().tolist() == list(range(8))  # mesh_utils orders GPUs by XLA's global id


def test_tpu_devices_of_several_slices_need_dcn_factors():
    devices = fake_devices("tpu", 2, 4, slices=2)
    with pytest.raises(ShardingError, match="span 2 TPU slices: set mesh.dcn_data"):
        device_mesh.device_grid(MeshConfig(data=2, fsdp=4).resolve(8), devices)


def test_a_tpu_shape_that_splits_the_torus_is_built_with_a_warning_not_a_traceback(caplog):
    """A v5e-16 (4 x 4 chips) as data 2 x fsdp 8: JAX's create_device_mesh raised NotImplementedError naming
    allow_split_physical_axes, which fxjax has no key for (a traceback from `fxjax sft`). It is built with that
    option, every chip once, and a warning says the shape splits the torus; a shape along it says nothing."""
    chips = [SimpleNamespace(id=i, process_index=i // 4, platform="tpu", device_kind="TPU v5 lite",
                             coords=(i % 4, i // 4, 0), core_on_chip=0, slice_index=0) for i in range(16)]
    with pytest.raises(NotImplementedError):  # (what JAX does on its own: the case this test is about)
        device_mesh.mesh_utils.create_device_mesh((2, 8, 1), chips)
    with caplog.at_level(logging.WARNING, logger="fxjax.device_mesh"):
        grid = device_mesh.device_grid(MeshConfig(data=2, fsdp=8).resolve(16), chips)
    assert grid.shape == (2, 8, 1) and sorted(ids(grid).ravel().tolist()) == list(range(16))
    assert "mesh 2x8x1 splits a physical axis of the TPU v5 lite chips' torus (4x4x1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fxjax.device_mesh"):
        assert device_mesh.device_grid(MeshConfig(data=4, fsdp=4).resolve(16), chips).shape == (4, 4, 1)
    assert "splits" not in caplog.text
    # multislice (two such slices over DCN): each slice's block built the same way
    slices = [SimpleNamespace(**{**vars(c), "id": 16 * s + c.id, "process_index": 4 * s + c.process_index,
                                 "slice_index": s}) for s in range(2) for c in chips]
    with caplog.at_level(logging.WARNING, logger="fxjax.device_mesh"):
        grid = device_mesh.device_grid(MeshConfig(data=2, fsdp=8, tensor=2, dcn_data=2).resolve(32), slices)
    assert grid.shape == (2, 8, 2) and "mesh 2x8x2 splits a physical axis" in caplog.text
    assert {d.slice_index for d in grid[0].ravel()} == {0} and {d.slice_index for d in grid[1].ravel()} == {1}


def test_make_mesh_names_what_it_takes_when_given_a_tuple_or_text():
    for wrong in ((1, 1, 1), "1,1,1"):
        with pytest.raises(TypeError, match=r"make_mesh takes a MeshConfig \(MeshConfig\(data=..., fsdp=..., "
                                            r"tensor=...\)\), a mapping of its keys"):
            device_mesh.make_mesh(wrong)
    assert dict(device_mesh.make_mesh({"fsdp": -1}).shape) == dict(device_mesh.make_mesh().shape)


# ---- DCN: hybrid meshes ----------------------------------------------------------------------------

def test_dcn_data_puts_one_ici_block_per_host():
    # GPU hosts carry no slices: each process is one granule of the slow network.
    grid = device_mesh.device_grid(MeshConfig(data=2, fsdp=4, dcn_data=2).resolve(8), fake_devices("gpu", 2, 4))
    assert grid.shape == (2, 4, 1)
    assert procs(grid)[:, :, 0].tolist() == [[0] * 4, [1] * 4]


def test_dcn_fsdp_splits_fsdp_across_slices():
    # 2 slices of 2 processes each: the slices are the granules, fsdp's outer factor crosses them.
    devices = fake_devices("gpu", 4, 2, slices=2)
    cfg = MeshConfig(data=1, fsdp=-1, tensor=2, dcn_fsdp=2).resolve(8)
    assert (cfg.ici_shape, cfg.dcn_shape) == ((1, 2, 2), (1, 2, 1))
    grid = device_mesh.device_grid(cfg, devices)
    assert grid.shape == (1, 4, 2)
    slice_of = np.vectorize(lambda d: d.slice_index, otypes=[int])(grid)
    assert slice_of[0, :, 0].tolist() == [0, 0, 1, 1]
    assert (slice_of[..., 0] == slice_of[..., 1]).all()  # tensor never crosses a slice


def test_dcn_product_must_match_slices_or_processes():
    with pytest.raises(ShardingError, match=r"dcn_data=4 x dcn_fsdp=1 = 4, but the devices span 1 slice\(s\) "
                                            r"and 2 process\(es\)"):
        device_mesh.device_grid(MeshConfig(data=4, fsdp=2, dcn_data=4).resolve(8), fake_devices("gpu", 2, 4))


def test_dcn_validation_errors():
    with pytest.raises(ShardingError, match="dcn_data=2 must divide data=3"):
        MeshConfig(data=3, dcn_data=2).resolve(3)
    with pytest.raises(ShardingError, match="dcn_fsdp=3 must divide fsdp=4"):
        MeshConfig(fsdp=-1, dcn_fsdp=3).resolve(4)
    with pytest.raises(ShardingError, match="dcn_data must be >= 1"):
        MeshConfig(data=2, dcn_data=0).resolve(2)
    with pytest.raises(ShardingError, match="unknown mesh axis"):
        MeshConfig.from_dict({"dcn_tensor": 2})
    resolved = MeshConfig.from_dict({"data": -1, "fsdp": 2, "dcn_data": 2}).resolve(8)
    assert resolved == MeshConfig(data=4, fsdp=2, tensor=1, dcn_data=2, dcn_fsdp=1)


# ---- cluster detection -----------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:1234", "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


def test_detect_cluster_finds_what_jax_would():
    detect = distributed.detect_cluster
    assert detect({}) is None
    assert detect(SLURM) == "SLURM (4 processes)"
    assert detect({**SLURM, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert detect({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}) is None  # JAX needs all
    assert detect(OMPI) == "Open MPI (8 processes)"
    assert detect({"OMPI_COMM_WORLD_SIZE": "8"}) is None  # not launched by mpirun: JAX finds no coordinator
    assert detect({**SLURM, **OMPI}) == "Open MPI (8 processes)"  # JAX's order: Open MPI first
    gke = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "0"}
    assert detect(gke) is None  # not on a Cloud TPU VM: JAX ignores these
    assert detect(gke, cloud_tpu_vm=True) == "GKE TPU pod (4 processes)"
    assert detect({**gke, "MEGASCALE_NUM_SLICES": "2"}, cloud_tpu_vm=True) == "GKE TPU pod (8 processes)"
    assert detect({"TPU_WORKER_HOSTNAMES": "w0"}, cloud_tpu_vm=True) is None
    assert detect({}, cloud_tpu_vm=True, tpu_metadata_processes=8) == "Cloud TPU pod (8 processes)"
    assert detect({}, cloud_tpu_vm=True, tpu_metadata_processes=1) is None
    with pytest.raises(distributed.DistributedError, match="SLURM_NTASKS='four' is not an integer"):
        detect({**SLURM, "SLURM_NTASKS": "four"})


def test_log_lines():
    assert distributed.describe(None, {}) == "fxjax.distributed: single process (no cluster environment found)"
    assert distributed.describe("SLURM (4 processes)", {}) == (
        "fxjax.distributed: SLURM (4 processes) detected; joining via jax.distributed.initialize()")
    assert distributed.describe("SLURM (4 processes)", {"FXJAX_NO_AUTO_DISTRIBUTED": "1"}) == (
        "fxjax.distributed: SLURM (4 processes) detected, but FXJAX_NO_AUTO_DISTRIBUTED=1: "
        "staying a single process")


@pytest.fixture
def joins(monkeypatch):
    """Calls of jax.distributed.initialize (recorded, never made); the CPU collectives setting restored."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    collectives = jax.config.jax_cpu_collectives_implementation
    yield calls
    jax.config.update("jax_cpu_collectives_implementation", collectives)


def test_initialize_joins_a_detected_cluster(joins):
    lines = []
    distributed.initialize(environ=SLURM, log=lines.append)
    assert joins == [{"initialization_timeout": 300}]  # JAX fills coordinator, count and id itself
    assert lines == ["fxjax.distributed: SLURM (4 processes) detected; joining via jax.distributed.initialize()"]


def test_a_coordinator_address_alone_joins_a_detected_cluster_at_it(joins):
    """JAX takes JAX_COORDINATOR_ADDRESS alone under SLURM (the count and id from SLURM's variables); fxjax
    refused it ("set without num_processes"). In a detected cluster it is the join's address now; outside
    one it is still an error (every process would run alone)."""
    lines = []
    cfg = distributed.initialize(environ={**SLURM, "JAX_COORDINATOR_ADDRESS": "node1:9999"}, log=lines.append)
    assert joins == [{"initialization_timeout": 300, "coordinator_address": "node1:9999"}]
    assert lines == ["fxjax.distributed: SLURM (4 processes) detected; joining via jax.distributed.initialize() at "
                     "the coordinator node1:9999 given (FXJAX_COORDINATOR or JAX_COORDINATOR_ADDRESS)"]
    assert cfg.coordinator_address == "node1:9999"
    with pytest.raises(distributed.DistributedError, match=r"coordinator_address \(FXJAX_COORDINATOR\) set without "
                                                           r"num_processes"):
        distributed.initialize(environ={"JAX_COORDINATOR_ADDRESS": "node1:9999"}, log=lines.append)
    with pytest.raises(distributed.DistributedError, match=r"set without num_processes"):
        distributed.initialize(environ={**SLURM, "JAX_COORDINATOR_ADDRESS": "node1:9999",
                                        "FXJAX_NO_AUTO_DISTRIBUTED": "1"}, log=lines.append)
    assert len(joins) == 1


def test_a_slurm_node_with_more_gpus_than_tasks_is_warned_about_before_the_join(joins):
    """One SLURM task a node on 8 GPUs: JAX gives each process the GPU of its SLURM_LOCALID, so the run trained
    on 1 GPU of 8 a node without a word; the join says so and how to use them, unless JAX_LOCAL_DEVICE_IDS says
    which GPUs a process takes or there are as many tasks as GPUs."""
    lines = []
    node = {**SLURM, "SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "1(x4)"}
    distributed.initialize(environ=node, log=lines.append)
    assert lines[-1] == ("fxjax.distributed: warning: SLURM gives this node 8 GPUs and 1 task(s), and JAX gives each "
                         "process only the GPU of its SLURM_LOCALID: 7 GPU(s) here would sit idle; run one task per "
                         "GPU (srun --ntasks-per-node=8 --gpus-per-node=8, no --gpus-per-task: bound to a task, its "
                         "GPU is device 0, not its SLURM_LOCALID), or, one task a node, export "
                         "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7")
    lines.clear()
    distributed.initialize(environ={**node, "FXJAX_COORDINATOR": "n1:8476", "FXJAX_NUM_PROCESSES": "4",
                                    "FXJAX_PROCESS_ID": "0"}, log=lines.append)
    assert "7 GPU(s) here would sit idle" in lines[-1]  # (explicit settings: JAX still picks the GPU by SLURM)
    for quiet in ({**node, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}, {**node, "SLURM_TASKS_PER_NODE": "8(x4)"},
                  {**node, "SLURM_NTASKS_PER_NODE": "8"}, SLURM):
        lines.clear()
        distributed.initialize(environ=quiet, log=lines.append)
        assert not any("warning" in line for line in lines), (quiet, lines)


def test_a_detected_join_given_another_process_count_than_process_0_is_an_error(monkeypatch):
    """A detected cluster's count is read on each host from its own variables: one host given 3 where process 0
    has 4 joined all the same (the coordinator counts process 0's) and waited in every exchange for a process
    that never comes. The count is compared after a detected join as after an explicit one."""
    from jax._src.distributed import global_state

    from fxjax import host_exchange

    class Store:  # the coordination service's key-value store, process 0 having written its count
        kv = {"fxjax/process_count/0": "4"}

        def key_value_set(self, key, value):
            self.kv[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            return self.kv[key]

    def join(**kwargs):  # what jax.distributed.initialize leaves for process 1 told SLURM_NTASKS=3
        for name, value in (("client", Store()), ("process_id", 1), ("num_processes", 3)):
            monkeypatch.setattr(global_state, name, value)

    monkeypatch.setattr(jax.distributed, "initialize", join)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(host_exchange, "_RUN_SIZE", None)
    collectives = jax.config.jax_cpu_collectives_implementation
    try:
        with pytest.raises(distributed.DistributedError, match=r"this process \(process 1\) was started as one of 3 "
                           r"processes and process 0 as one of 4: .*SLURM_NTASKS"):
            distributed.initialize(environ={**SLURM, "SLURM_NTASKS": "3"}, log=lambda line: None)
    finally:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    assert Store.kv["fxjax/process_count/1"] == "3" and host_exchange._RUN_SIZE == 4  # (stop_peers waits for 4)


def test_explicit_settings_win_over_detection(joins):
    lines = []
    cfg = distributed.initialize(environ={**SLURM, "FXJAX_NUM_PROCESSES": "1"}, log=lines.append)
    assert cfg.num_processes == 1 and not cfg.multi_process
    cfg = distributed.initialize({"num_processes": 1}, environ=OMPI, log=lines.append)
    assert cfg.num_processes == 1
    assert joins == [] and lines == []  # explicit settings decide alone: no detection, no line


def test_opt_out_stays_single_process(joins):
    lines = []
    cfg = distributed.initialize(environ={**SLURM, "FXJAX_NO_AUTO_DISTRIBUTED": "1"}, log=lines.append)
    assert joins == [] and not cfg.multi_process
    assert lines == ["fxjax.distributed: SLURM (4 processes) detected, but FXJAX_NO_AUTO_DISTRIBUTED=1: "
                     "staying a single process"]
    distributed.initialize(environ={**SLURM, "FXJAX_NO_AUTO_DISTRIBUTED": "0"}, log=lines.append)
    assert len(joins) == 1  # "0" does not opt out


def test_no_cluster_logs_one_info_line(joins, caplog):
    with caplog.at_level(logging.INFO, logger="fxjax.distributed"):
        cfg = distributed.initialize(environ={})
    assert joins == [] and not cfg.multi_process
    assert [r.getMessage() for r in caplog.records if r.name == "fxjax.distributed"] == [
        "fxjax.distributed: single process (no cluster environment found)"]


# ---- which rows a process builds, and which it counts --------------------------------------------

@pytest.mark.parametrize("shape, shard_rows, shares", [
    ((2, 1, 1), True, [1.0, 1.0]),  # each process its own half
    ((1, 1, 2), True, [1.0, 0.0]),  # tensor across the processes: both build the whole batch
    ((2, 1, 1), False, [1.0, 0.0]),  # a replicated batch (mesh.allow_replicated_batch)
    ((2, 1, 2), True, [1.0, 0.0, 1.0, 0.0]),  # 4 processes: two build each half
])
def test_a_shard_several_processes_build_counts_once(monkeypatch, shape, shard_rows, shares):
    """Tokens a second sum every process's count of the rows it built: a process counts the share of its
    shards that no lower-index process builds, so each row counts once (it counted twice with tensor or a
    replicated batch across processes)."""
    from fxjax.train.batching import process_rows

    n = len(shares)
    grid = np.array([SimpleNamespace(process_index=p * n // int(np.prod(shape))) for p in range(int(np.prod(shape)))],
                    dtype=object).reshape(shape)
    mesh = SimpleNamespace(axis_names=device_mesh.AXES, devices=grid, shape=dict(zip(device_mesh.AXES, shape)))
    counted = []
    for p in range(n):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        mine = process_rows(mesh, 8, shard_rows)
        counted.append(mine.counted_share * len(mine.rows))
        assert mine.counted_share == shares[p]
    assert sum(counted) == 8  # every row of the batch once


def test_a_second_minus_one_names_the_data_default():
    """mesh.fsdp=-1 alone meets data's default -1: the error says where the second -1 came from."""
    with pytest.raises(ShardingError, match=r"at most one mesh size may be -1, .*data is -1 unless set .*mesh.data=1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_mesh_sizes_that_are_not_integers_are_refused():
    """MeshConfig.from_dict (make_mesh's dict form) truncated 2.5 to 2 and took true for 1."""
    assert MeshConfig.from_dict({"data": "2", "fsdp": 4.0}).shape == (2, 4, 1)
    for value in (2.5, True, "two"):
        with pytest.raises(ShardingError, match=r"mesh\.fsdp: .* is not an integer"):
            MeshConfig.from_dict({"fsdp": value})


def test_a_process_holds_the_batch_shards_of_its_data_and_fsdp_positions():
    """process_batch_shards on a data x fsdp x tensor mesh (2 x 2 x 2): a [B] array sharded over
    ("data", "fsdp") gives block d * fsdp + f to device (d, f, .), so a process holding data row 0 holds
    blocks 0 and 1, one holding fsdp column 0 holds blocks 0 and 2 (an fsdp-major order swapped them, caught
    only by the two-process test)."""
    from fxjax.device_mesh import process_batch_shards

    def mesh(process_of):
        devices = np.empty((2, 2, 2), object)
        for d, f, t in np.ndindex(2, 2, 2):
            devices[d, f, t] = SimpleNamespace(process_index=process_of(d, f, t))
        return SimpleNamespace(axis_names=("data", "fsdp", "tensor"), shape={"data": 2, "fsdp": 2, "tensor": 2},
                               devices=devices)

    by_data = mesh(lambda d, f, t: d)
    assert [process_batch_shards(by_data, p) for p in (0, 1)] == [(0, 1), (2, 3)]
    by_fsdp = mesh(lambda d, f, t: f)
    assert [process_batch_shards(by_fsdp, p) for p in (0, 1)] == [(0, 2), (1, 3)]
    by_tensor = mesh(lambda d, f, t: t)  # every process holds every batch shard
    assert process_batch_shards(by_tensor, 1) == (0, 1, 2, 3)


def test_an_explicit_join_says_what_it_waits_for_and_its_timeout_is_a_setting(joins):
    """A join whose peer never came printed nothing for 300 s, then aborted with a C++ trace naming none of
    the settings; a coordinator without a port died in an IndexError inside JAX; the timeout could not be
    set. Now the join line comes first, the address is checked, and distributed.initialization_timeout
    (FXJAX_INITIALIZATION_TIMEOUT) reaches JAX."""
    lines = []
    env = {"FXJAX_COORDINATOR": "host0:8476", "FXJAX_NUM_PROCESSES": "2", "FXJAX_PROCESS_ID": "1",
           "FXJAX_INITIALIZATION_TIMEOUT": "20", "https_proxy": "http://proxy:3128", "no_proxy": "localhost"}
    distributed.initialize(environ=env, log=lines.append)
    assert joins == [{"coordinator_address": "host0:8476", "num_processes": 2, "process_id": 1,
                      "initialization_timeout": 20}]
    first, note = lines[0].split("\n")
    assert first.startswith("fxjax.distributed: process 1 of 2 joining at host0:8476; waiting up to 20 s for all 2")
    assert note.startswith("fxjax.distributed: note: https_proxy is set and no_proxy does not name host0")
    joins.clear()
    lines.clear()
    distributed.initialize({"initialization_timeout": 45}, environ={**env, "no_proxy": "host0"}, log=lines.append)
    assert joins[0]["initialization_timeout"] == 45 and "\n" not in lines[0]  # the proxy bypasses host0
    assert distributed.resolve(environ={**env, "FXJAX_COORDINATOR": "[fe80::1]:8476"}).coordinator_address == "[fe80::1]:8476"
    lines.clear()
    distributed.initialize(environ={**env, "no_proxy": ".example.com", "FXJAX_COORDINATOR": "w0.example.com:8476"},
                           log=lines.append)
    assert "\n" not in lines[0]  # a domain suffix in no_proxy covers the host
    for bad in ("host0", "host0:port", ":8476", "fe80::1:8476", "host0:70000"):
        with pytest.raises(distributed.DistributedError, match=rf"coordinator_address '{bad}' \(FXJAX_COORDINATOR\) "
                                                              r"must be HOST:PORT"):
            distributed.resolve(environ={**env, "FXJAX_COORDINATOR": bad})
