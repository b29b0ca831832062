"""One process of a multi-process job that writes SFT checkpoints as `fxjax sft` does, without training.

    FXJAX_COORDINATOR=localhost:PORT FXJAX_NUM_PROCESSES=2 FXJAX_PROCESS_ID=i python checkpoint_worker.py sft.yaml

Every process builds the run's model with LoRA on the run's mesh (fxjax.train.run_setup.build_model), the train
state (init_state, the run's optimiser) and saves it with the run's TrainCheckpointer and resolved config, as
run_sft does, for steps 2 and 3. The LoRA parameters of each step are random (the same on every process), so
the checkpoints change the model and differ from each other; the training step itself is left out because
compiling it costs a minute on a CPU (tests/test_sft.py covers training and its checkpoints).
"""

from __future__ import annotations

import sys

from fxjax import distributed


def main(config_path: str) -> None:
    distributed.initialize({})  # from FXJAX_* variables
    import jax
    import numpy as np

    from fxjax.device_mesh import MeshConfig, make_mesh, put
    from fxjax.train.checkpointing import TrainCheckpointer
    from fxjax.train.optimizer import make_optimizer
    from fxjax.train.resume import checkpoint_data_state
    from fxjax.train.run_setup import build_model, init_state
    from fxjax.train.step import split_model
    from fxjax.train_config import load_sft_config

    cfg = load_sft_config(config_path)
    mesh = make_mesh(MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    print(f"worker {jax.process_index()}: {jax.process_count()} process(es), {jax.device_count()} device(s)",
          flush=True)
    model = build_model(cfg, mesh)
    _, params, base, rest = split_model(model)
    tx, _ = make_optimizer(cfg.optim, 3)
    checkpointer = TrainCheckpointer(cfg.checkpoint_dir, keep=3, async_save=False)
    for step in (2, 3):
        rng = np.random.default_rng(step)  # same draws on every process, leaf by leaf in tree order
        params = jax.tree.map(lambda x: put(rng.normal(0, 0.2, x.shape).astype(np.float32), x.sharding), params)
        state, shardings = init_state(params, base, rest, tx, seed=cfg.train.seed, mesh=mesh)
        state = state._replace(step=put(np.asarray(step, np.int32), shardings.replicated))
        # the data state as run_sft writes it (no iterator: nothing was read)
        checkpointer.save(step, state, checkpoint_data_state({}, {}, 0, mesh), cfg.to_dict())
        checkpointer.wait()
    checkpointer.close()
    print(f"worker {jax.process_index()}: saved steps 2 and 3 to {cfg.checkpoint_dir}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
