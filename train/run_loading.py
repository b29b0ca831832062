"""A trained run's model at one checkpoint step, for evaluation, detection and export.

    run = load_run("runs/sft", step=None)          # the newest step; or step=N; or step="beta" (GRPO)
    run.model                                      # base + LoRA with the step's LoRA parameters, eval mode
    run.config                                     # the run's SFTConfig / GRPOConfig, as it was resolved
    gamma = load_run_step(run, "gamma")            # another step into the same model: only its LoRA is read

A run directory is a `fxjax sft` / `fxjax grpo` train.output_dir (holding checkpoints/) or a checkpoint
directory itself (holding the step folders). Each committed step `<dir>/<N>/` holds the train state and
the run's resolved config (train.checkpointing); loading reads that config, rebuilds the model with LoRA
exactly as the run built it (train.run_setup.build_model: the base checkpoint or preset, fresh LoRA or
the PEFT adapter GRPO started from, its shape from the run's own copy, checkpoints/start_lora, which
stays as the run read it when that adapter or run moves or changes) and restores the LoRA parameters of step N over it (a partial
restore: the optimiser state, step and RNG key are not read).

Reading never writes: an in-progress save (`<N>.orbax-checkpoint-tmp-*`) is not a step and is left alone,
so a run that is still training can be evaluated or exported. Checkpoints written by several processes
load in one: orbax reassembles every array onto this process's mesh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax

from fxjax.merged_lora import MergedLoRAError, refuse_merged_twice
from fxjax.run_files import (RunLoadError, brief_error, checkpoint_dir_of, committed_steps, read_run_config,
                             resolve_step, steps_text)
from fxjax.run_start import start_from_kept_copy

__all__ = ["LoadedRun", "RunLoadError", "check_run_paths", "checkpoint_dir_of", "committed_steps", "config_as_loaded",
           "load_run",
           "load_run_step", "read_run_config", "resolve_step", "run_config", "start_from_kept_copy"]


@dataclass
class LoadedRun:
    model: Any  # Qwen25VL with LoRA, eval mode, LoRA parameters of `step`
    config: Any  # SFTConfig or GRPOConfig (with the overrides load_run applied)
    kind: str  # "sft" or "grpo"
    step: int
    checkpoint_dir: Path
    mesh: Any = None  # where the model is placed
    overrides: dict[str, Any] = field(default_factory=dict)  # load_run's model_path, dtype, ...: load_run_step's too


def _override_model(cfg, model_path: str | None, dtype: str | None, param_dtype: str | None,
                    attention: str | None = None, scan_layers: bool | None = None):
    """The run's config with the base model moved (model_path), the weights' dtypes, the attention kernel
    (a run trained with cudnn loads on a CPU with attention="auto") or the layers' layout replaced."""
    m = cfg.model
    changes: dict[str, Any] = {}
    if model_path is not None:
        changes.update(path=str(model_path), preset=None)
    if dtype is not None:
        changes["dtype"] = dtype
    if param_dtype is not None:
        changes["param_dtype"] = param_dtype
    if attention is not None:
        changes["attention"] = attention
    if scan_layers is not None:
        changes["scan_layers"] = bool(scan_layers)
    if not changes:
        return cfg
    # A null data.tokenizer means model.path's tokenizer, so it follows a moved base model; so does one
    # given as the same folder (configs/sft.yaml's `data.tokenizer: <model.path>`).
    data = cfg.data
    if (model_path is not None and data.tokenizer is not None and m.path is not None
            and Path(data.tokenizer).resolve() == Path(m.path).resolve()):
        data = dataclasses.replace(data, tokenizer=None)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **changes), data=data)


def config_as_loaded(cfg, checkpoint_dir: Path, model_path: str | None = None, *, dtype: str | None = None,
                     param_dtype: str | None = None, attention: str | None = None, scan_layers: bool | None = None,
                     log: Callable[[str], None] | None = None):
    """A run's saved config (of a step in `checkpoint_dir`) as `load_run` builds its model from it: the
    overrides applied (`_override_model`: the base model moved to `model_path`, ...), the start from the
    run's own copy (`start_from_kept_copy`: its shape, and for a from_run run whose other run moved, its
    base model and tokenizer)."""
    cfg = _override_model(cfg, model_path, dtype, param_dtype, attention, scan_layers)
    return start_from_kept_copy(cfg, checkpoint_dir, model_path is not None, log)


def run_config(run: str | Path, step: int | str | None = None, model_path: str | None = None):
    """The run's config at `step` as `load_run` reads it (`config_as_loaded`); nothing is loaded."""
    ckpt = checkpoint_dir_of(run).absolute()
    _, cfg, _ = resolve_step(ckpt, step)
    return config_as_loaded(cfg, ckpt, model_path)


def check_run_paths(cfg, checkpoint_dir: Path) -> None:
    """A RunLoadError naming model.path or model.adapter when the run's base model or start adapter is not
    here (said before anything else that follows from it, such as its tokenizer)."""
    m = cfg.model
    for key, value, hint in (("model.path", m.path, "pass the base model's directory (--model; a run that starts "
                                                    "from this one: model.path beside model.from_run)"),
                             ("model.adapter", m.adapter, "the PEFT adapter this run started from must be "
                                                         "where the run read it")):
        if value is not None and not Path(value).is_dir():
            raise RunLoadError(f"the run in {checkpoint_dir} was trained from {key}={value}, which does not exist "
                               f"here; {hint}")


def _exact_param_dtype(cfg) -> str:
    """`hf_checkpoint.exact_param_dtype` of the run's base model (`base_model_section`); float32 for a
    preset, or when the base is not where a run names it (loading it then says so)."""
    from fxjax.hf_checkpoint import exact_param_dtype
    from fxjax.train_config import base_model_section

    m = base_model_section(cfg)
    return exact_param_dtype(m.path) if m is not None and m.path is not None and Path(m.path).is_dir() else "float32"


def _check_stored_shapes(layout: dict, stored, where: str, model, model_path: str | None) -> None:
    """LoRA trained on another base model (a 3B run loaded with --model of a 7B: every name of the 7B's 28
    layers is among the 3B's 36): an error naming the first array that differs and the base model, where
    orbax's own ("not compatible with the stored shape") was reported as a corrupted checkpoint."""
    bad = [(name, tuple(stored[name].shape), tuple(x.shape)) for name, x in layout.items()
           if getattr(stored.get(name), "shape", None) is not None and tuple(stored[name].shape) != tuple(x.shape)]
    if not bad:
        return
    name, there, here = bad[0]
    base = model.path or model.preset
    hint = (f"--model {model_path} is not the base model the run was trained on; pass that one" if model_path
            else f"the base model {base} is not the one the run was trained on (was it replaced?)")
    raise RunLoadError(f"{where} holds LoRA arrays of other shapes than this model's: {len(bad)} differ, e.g. "
                       f"{name} {there} there, {here} here; {hint}")


def _check_stored_names(layout: dict, stored, where: str, model) -> None:
    """Every LoRA array the checkpoint holds has its place in this model (the restore is partial, leaving the
    optimiser state on disk, so one it has no place for would be dropped without a word): a model built
    with fewer LoRA targets (the run's start adapter, model.adapter, replaced by another since) is an error
    naming the first array and what to check."""
    lost = sorted(name for name in stored if name.startswith("params.") and name not in layout)
    if not lost:
        return
    start = (f"model.adapter {model.adapter}, which the run started from and whose targets it rebuilds, now "
             "holds another adapter?" if model.adapter else "another base model or LoRA targets?")
    raise RunLoadError(f"{where} holds {len(lost)} LoRA arrays this model has no place for, e.g. "
                       f"{lost[0][len('params.'):]} ({start}); nothing was loaded")


def data_parallel_mesh():
    """Every device on the data axis, each holding the whole model (a model too large for one device needs
    an fsdp axis: `--mesh fsdp=N`)."""
    from fxjax.device_mesh import MeshConfig, make_mesh

    return make_mesh(MeshConfig(data=-1))


def run_mesh(mesh_section, log: Callable[[str], None] | None = None):
    """Where a loaded run goes unless a mesh is given: the run's own split of the model (its mesh.fsdp and
    mesh.tensor) with the rest of the devices here on the data axis, so a model that needed fsdp=8 to fit
    in training is split so in eval, detect and export too (it was loaded whole on every device); every
    device on the data axis when the run did not split the model, or when its split does not fit the
    devices here (said)."""
    import jax

    from fxjax.device_mesh import MeshConfig, ShardingError, make_mesh

    fsdp, tensor = mesh_section.fsdp, mesh_section.tensor
    if (fsdp, tensor) == (1, 1):
        return data_parallel_mesh()
    try:  # (an axis at -1 takes every device: the data axis is then 1)
        return make_mesh(MeshConfig.data_takes_rest(fsdp=fsdp, tensor=tensor, dcn_data=mesh_section.dcn_data,
                                                    dcn_fsdp=mesh_section.dcn_fsdp))
    except (ShardingError, ValueError):  # (mesh_utils' own errors for a layout these devices cannot take)
        if log is not None:
            log(f"note: the run split the model over mesh fsdp={fsdp} x tensor={tensor}, which "
                f"{jax.device_count()} device(s) here cannot hold: every device on the data axis, the model "
                f"whole on each (--mesh to choose)")
        return data_parallel_mesh()


def load_run(run: str | Path, step: int | str | None = None, *, mesh=None, model_path: str | None = None,
             dtype: str | None = None, param_dtype: str | None = None, attention: str | None = None,
             scan_layers: bool | None = None,
             log: Callable[[str], None] | None = None) -> LoadedRun:
    """The model of `run` at `step` (default: the newest committed step; a stage name: the checkpoint at
    that GRPO stage's end, `fxjax.run_files.resolve_step`).

    mesh: where to place the model (default: `run_mesh`: the run's fsdp and tensor axes, the other devices
    on the data axis).
    model_path: the base model's directory when it moved since training (replaces model.path/preset).
    dtype / param_dtype: compute and storage dtype of the base weights (default: the run's); param_dtype
    "exact": the smaller of bfloat16 and float32 that holds the base checkpoint's weights as stored
    (`fxjax.hf_checkpoint.exact_param_dtype`; float32 for a preset), for a merge that must see them unrounded.
    attention: the attention kernel (model.attention: auto | xla | cudnn | splash; default: the run's).
    scan_layers: the decoder layers' layout (model.scan_layers; default: the run's); the checkpoint's LoRA
    parameters are converted to it (train.checkpoint_layout).
    Raises RunLoadError naming the step and listing the steps that exist when the step is missing, its
    files are incomplete or corrupted, or the run's base model cannot be found.
    """
    from fxjax.train.run_setup import build_model
    from fxjax.train_config import base_model_section

    ckpt = checkpoint_dir_of(run).absolute()
    step, cfg, kind = resolve_step(ckpt, step)
    exact = param_dtype == "exact"
    cfg = config_as_loaded(cfg, ckpt, model_path, dtype=dtype, param_dtype=None if exact else param_dtype,
                           attention=attention, scan_layers=scan_layers, log=log)
    check_run_paths(cfg, ckpt)
    if exact:  # known only now: the base model may have moved (model_path) or come from the run's copy
        cfg = _override_model(cfg, None, None, _exact_param_dtype(cfg))
    if mesh is None:
        mesh = run_mesh(cfg.mesh, log)
    if log is not None:
        stored = cfg.model.param_dtype or cfg.model.dtype
        base = base_model_section(cfg) or cfg.model  # (a from_run run names its base through the runs before it)
        base_name = base.path or (f"preset {base.preset}" if base.preset else "that of the run it started from")
        if base.path is not None and not Path(base.path).is_absolute():  # (which folder a relative one read)
            base_name += f" ({Path(base.path).absolute()})"
        log(f"loading the {kind} run in {ckpt} at step {step}: base {base_name} "
            f"({cfg.model.dtype}" + (f", weights stored in {stored})" if stored != cfg.model.dtype else ")")
            + f", on mesh {dict(mesh.shape)}")
    model = build_model(cfg, mesh)
    _restore_lora(model, cfg, ckpt, step, model_path)
    model.eval()
    return LoadedRun(model=model, config=cfg, kind=kind, step=step, checkpoint_dir=ckpt, mesh=mesh,
                     overrides=dict(model_path=model_path, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                    scan_layers=scan_layers))


def load_run_step(loaded: LoadedRun, step: int | str, *, log: Callable[[str], None] | None = None) -> LoadedRun:
    """Another step (or stage end) of the run `loaded` came from, restored into the same model: only that
    step's LoRA parameters are read, the base weights are not read again and the model keeps its shapes, so
    programs compiled for it (decoding) are reused. `loaded.model` then holds the new step's LoRA (the
    returned LoadedRun shares it). A step saved with other model or LoRA settings than `loaded`'s (a run
    resumed with another model section) is loaded whole, `load_run`, and said so; `loaded.model` is let go
    first (None), so that two models are not held at once."""
    ckpt = loaded.checkpoint_dir
    step, cfg, kind = resolve_step(ckpt, step)
    o = loaded.overrides
    exact = o.get("param_dtype") == "exact"
    cfg = config_as_loaded(cfg, ckpt, o.get("model_path"), dtype=o.get("dtype"),
                           param_dtype=None if exact else o.get("param_dtype"), attention=o.get("attention"),
                           scan_layers=o.get("scan_layers"))
    if exact:
        cfg = _override_model(cfg, None, None, _exact_param_dtype(cfg))
    if (_resolved_paths(cfg.model), cfg.lora) != (_resolved_paths(loaded.config.model), loaded.config.lora):
        if log is not None:
            log(f"step {step} was saved with other model or LoRA settings than step {loaded.step}: loading it whole")
        loaded.model = None
        return load_run(ckpt, step, mesh=loaded.mesh, log=log, **o)
    if log is not None:
        log(f"step {step}: only its LoRA read, into the model of step {loaded.step} (its base weights kept)")
    _restore_lora(loaded.model, cfg, ckpt, step, o.get("model_path"))
    loaded.model.eval()
    return LoadedRun(model=loaded.model, config=cfg, kind=kind, step=step, checkpoint_dir=ckpt, mesh=loaded.mesh,
                     overrides=o)


def _resolved_paths(m):
    """A model section with its paths resolved: steps saved before and after fxjax recorded the run's folder
    (`tiny` and `/project/tiny`) name the same model."""
    return dataclasses.replace(m, **{k: str(Path(v).resolve()) for k in ("path", "adapter", "from_run")
                                     if (v := getattr(m, k)) is not None})


def _restore_lora(model, cfg, ckpt: Path, step: int, model_path: str | None) -> None:
    """The LoRA parameters of checkpoint `step` into `model` (built from `cfg`), each onto its sharding."""
    import orbax.checkpoint as ocp

    from flax import nnx

    from fxjax.train.checkpoint_layout import LayoutError, saved_layout, to_current_layout
    from fxjax.train.checkpointing import flatten_tree, ignore_io_left_behind, unflatten_tree
    from fxjax.train.step import split_model

    steps = committed_steps(ckpt)
    _, params, _, _ = split_model(model)
    # Only the LoRA parameters ("params.*" of the saved TrainState), each straight onto its sharding here;
    # the optimiser state, step and RNG stay on disk.
    template = {f"params.{name}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                for name, x in flatten_tree(params).items()}
    ignore_io_left_behind()
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            state_dir = ckpt / str(step) / "state"
            # saved with the other decoder layout (looped vs scan_layers): restored in its names, converted
            stored = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree  # names and shapes, nothing read
            layout = saved_layout(template, set(stored), str(state_dir), partial=True) or template
            _check_stored_shapes(layout, stored, f"the checkpoint of step {step} in {ckpt}", cfg.model, model_path)
            _check_stored_names(layout, stored, f"the checkpoint of step {step} in {ckpt}", cfg.model)
            restore_args = {name: ocp.ArrayRestoreArgs(sharding=x.sharding) for name, x in layout.items()}
            flat = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                layout, restore_args=restore_args, partial_restore=True))
        flat = to_current_layout(template, flat)
        restored = unflatten_tree(params, {name[len("params."):]: x for name, x in flat.items()})
    except LayoutError as err:
        raise RunLoadError(f"the checkpoint of step {step} in {ckpt} does not fit this model: {err}") from err
    except RunLoadError:
        raise
    except Exception as err:  # orbax raises many types for missing or damaged files; the message says which
        if not (ckpt / str(step)).exists():  # (not damaged: a run still writing there pruned it meanwhile)
            raise RunLoadError(f"the checkpoint of step {step} in {ckpt} was removed while it was read: a run still "
                               f"training there keeps only its newest checkpoints (checkpoint.keep); give a step it "
                               f"keeps (steps now: {steps_text(committed_steps(ckpt))}) or wait for it to end"
                               ) from err
        raise RunLoadError(f"the checkpoint of step {step} in {ckpt} cannot be restored (incomplete or corrupted: "
                           f"{brief_error(err)}); steps that exist: {steps_text(steps)}"
                           ) from err
    nnx.update(model, restored)
    try:
        refuse_merged_twice(model, f"the LoRA of step {step} in {ckpt}")
    except MergedLoRAError as err:
        raise RunLoadError(str(err)) from None
