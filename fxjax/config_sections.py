"""The sections of a run config (model, lora, mesh, distributed, data, optim, train, checkpoint, eval, export):
one frozen dataclass each, with its defaults and its own checks (`validate(where)`, `where` the section's key).

fxjax.train_config assembles them into the run configs and loads them; checks across sections are there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import ClassVar, Literal

from fxjax.config_mapping import ConfigError, check_positive, check_seed
from fxjax.data.images import DEFAULT_MAX_IMAGE_PIXELS
from fxjax.image_processing import DEFAULT_MIN_PIXELS, RELEASE_MAX_PIXELS

__all__ = ["CheckpointSection", "DataSection", "DistributedSection", "EvalSection", "ExportSection", "LoRASection",
           "MeshSection", "ModelSection", "OptimSection", "REMAT_POLICIES", "TrainSection"]

# Names accepted by model.remat / model.remat_vision (see train.remat).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclass(frozen=True)
class ModelSection:
    """The base model: an HF checkpoint directory (`path`) or a preset with random init (`preset`)."""

    path: str | None = None  # HF Qwen2.5-VL directory (config.json + safetensors)
    preset: str | None = None  # tiny, 3b, 7b, 32b, 72b or a preset YAML; random init with init_seed
    init_seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] | None = None  # base weights' storage dtype (default: dtype)
    remat: str = "full"  # rematerialisation policy of the decoder layers (REMAT_POLICIES)
    remat_vision: str | None = None  # ... of the vision blocks (default: the same as remat)
    # attention kernel (fxjax.model.attention): auto = splash on TPU, cudnn on an NVIDIA GPU in bfloat16, else xla
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # decoder layers and vision blocks stacked and run under scan (fxjax.model.scan): compile time independent
    # of depth; the same numbers, checkpoints and adapters as the loop (false)
    scan_layers: bool = False
    adapter: str | None = None  # start from this PEFT adapter directory instead of fresh LoRA weights
    # or from a fxjax run directory (e.g. the SFT run): its base model and LoRA (with path: that base model's
    # directory now, when it moved; the tokenizer then follows path unless data.tokenizer is given)
    from_run: str | None = None
    # ... at this step, or at the end of this GRPO stage of that run (alpha, beta, ...; null: its newest checkpoint)
    from_run_step: int | str | None = None

    def validate(self, where: str) -> None:
        check_seed(self.init_seed, f"{where}.init_seed")
        if self.from_run is not None:
            if self.adapter is not None:
                raise ConfigError(f"{where}.from_run: starts from that run's LoRA; set {where}.adapter=null")
            if self.preset is not None:  # (a path is that run's base model where it is now, when it moved)
                raise ConfigError(f"{where}.from_run: the base model is that run's; set {where}.preset=null "
                                  f"({where}.path may name where that base model is now, if it moved)")
        elif (self.path is None) == (self.preset is None):
            raise ConfigError(f"{where}: set exactly one of model.path (an HF checkpoint directory), model.preset "
                              f"(random init) and model.from_run (a fxjax run directory)")
        elif self.from_run_step is not None:
            raise ConfigError(f"{where}.from_run_step: only with {where}.from_run")
        if isinstance(self.from_run_step, str) and not self.from_run_step.strip():
            raise ConfigError(f"{where}.from_run_step: give a step number or a GRPO stage's name, got an empty text")
        for name in ("remat", "remat_vision"):
            value = getattr(self, name)
            if value is not None and value not in REMAT_POLICIES:
                raise ConfigError(f"{where}.{name}: must be one of {list(REMAT_POLICIES)}, got {value!r}")


@dataclass(frozen=True)
class LoRASection:
    """LoRA adapters (model.lora.LoRAConfig): the shape of fresh ones (a start from model.adapter or
    model.from_run keeps that LoRA's shape); enabled = false is refused by `sft` and `grpo` (they train LoRA only)."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    use_rslora: bool = False
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    init_seed: int = 0  # seed of the A matrices

    def validate(self, where: str) -> None:
        check_positive(self.rank, f"{where}.rank")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):  # the update's scale: 0 would train nothing
            raise ConfigError(f"{where}.alpha: must be a positive number, got {self.alpha}")
        check_seed(self.init_seed, f"{where}.init_seed")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class MeshSection:
    """Device mesh axis sizes (fxjax.device_mesh.MeshConfig); one may be -1 (the rest of the devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Of data / fsdp, the factor that crosses TPU slices (multislice) or GPU hosts over the slow network;
    # data / dcn_data and fsdp / dcn_fsdp devices stay on the fast interconnect. 1: nothing crosses.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    # A global batch that does not divide over data x fsdp is an error; true replicates it on every batch
    # device instead (each computes the whole batch: wasted hardware, warned on every run).
    allow_replicated_batch: bool = False
    # With fsdp > 1: gather the weights once before each decoding pass (GRPO's rollout, the held-out
    # evaluation) rather than per generated token (fxjax.decode_weights). auto: when the gathered copy takes
    # at most half of the devices' free memory; true / false as TRL's ds3_gather_for_generation.
    gather_for_decoding: Literal["auto", "always", "never"] = "auto"

    VALUE_ALIASES: ClassVar[dict[str, tuple]] = {"gather_for_decoding": ((True, "always"), (False, "never"))}

    def axes(self) -> dict[str, int]:
        """The sizes fxjax.device_mesh.MeshConfig takes: MeshConfig(**section.axes())."""
        return {name: getattr(self, name) for name in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp")}


@dataclass(frozen=True)
class DistributedSection:
    """Multi-process start-up (fxjax.distributed); unset values come from FXJAX_* / JAX_* variables."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None
    initialization_timeout: int | None = None  # seconds every process waits for the others to join (null: 300)


@dataclass(frozen=True)
class DataSection:
    """Training/eval data; every field but train_files, eval_files and tokenizer passes through to
    fxjax.data.DataConfig under its own name, with the same default (`pipeline_fields`)."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    tokenizer: str | None = None  # directory with tokenizer.json (null: model.path; a preset needs one)
    root: str | None = None
    allow_absolute_paths: bool = False  # accept absolute image paths and symlinks out of the root (a dataset you trust)
    format: Literal["auto", "native", "swift"] = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    check_decode: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # an original image above it is refused (decompression bombs)
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = RELEASE_MAX_PIXELS
    max_length: int = 8192
    length_buckets: tuple[int, ...] = ()
    long_samples: Literal["truncate", "drop"] = "truncate"
    long_images: Literal["shrink", "drop"] = "shrink"  # an image over max_length's room: resized to fit | dropped
    prompts: Literal["auto", "templates", "record"] = "auto"
    system_prompt: str | None = None
    user_prompt: str | None = None  # null: the nine templates of fxjax.data.prompts; a text: that one prompt
    batch_size: int = 1  # global micro-batch (examples per forward pass, all processes together)
    shuffle: bool = True
    seed: int = 0
    worker_count: int = 0
    read_threads: int = 2
    prefetch_buffer_size: int = 8

    RUN_ONLY: ClassVar[tuple[str, ...]] = ("train_files", "eval_files", "tokenizer")

    def pipeline_fields(self) -> dict:
        """The fields DataConfig takes as they are (all but RUN_ONLY)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUN_ONLY}

    def validate(self, where: str) -> None:
        if not self.train_files:
            raise ConfigError(f"{where}.train_files: give at least one JSONL file")
        check_seed(self.seed, f"{where}.seed")
        for name in ("min_pixels", "max_pixels", "max_image_pixels", "max_length", "batch_size"):
            check_positive(getattr(self, name), f"{where}.{name}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"{where}.min_pixels ({self.min_pixels}) is above {where}.max_pixels "
                              f"({self.max_pixels})")


@dataclass(frozen=True)
class OptimSection:
    """optax AdamW with linear warmup then cosine (or constant / linear) decay, global-norm clipping and
    gradient accumulation (grad_accum micro-batches per update, scanned inside the one jitted step)."""

    # (transformers 5 reads a warmup_steps below 1 as a share of the run; here that is warmup_ratio)
    VALUE_HINTS: ClassVar[dict[str, str]] = {"warmup_steps": "a share of the run is optim.warmup_ratio"}

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05  # of the total steps (ignored when warmup_steps is set)
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0  # the decay ends at learning_rate * min_lr_ratio
    max_grad_norm: float | None = 1.0  # None: no clipping
    grad_accum: int = 1

    def validate(self, where: str) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"{where}.learning_rate: must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"{where}.max_grad_norm: must be positive or null, got {self.max_grad_norm}")
        check_positive(self.grad_accum, f"{where}.grad_accum")
        # (a min_lr_ratio below 0 turned the decay's end into gradient ascent; above 1, a rise)
        for name, low, high, closed in (("min_lr_ratio", 0.0, 1.0, True), ("b1", 0.0, 1.0, False),
                                        ("b2", 0.0, 1.0, False)):
            value = getattr(self, name)
            if not (low <= value <= high if closed else low <= value < high):
                raise ConfigError(f"{where}.{name}: must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"{where}.eps: must be a positive number, got {self.eps}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")


def steps_for_epochs(epochs: float, records: int, per_step: int) -> int:
    """Whole steps for `epochs` passes over `records` examples, `per_step` a step: rounded up, at least one.
    Exact for the decimal the config wrote (1.1 epochs of 100 records at 1 a step is 110 steps; in floats
    1.1 * 100 is 110.00000000000001, which rounded up to 111)."""
    exact = Fraction(repr(float(epochs))) * records / per_step
    return max(1, math.ceil(exact))


@dataclass(frozen=True)
class TrainSection:
    steps: int | None = None  # optimiser updates; or give epochs
    epochs: float | None = None  # passes over train_files (rounded up to whole updates)
    seed: int = 0  # dropout and anything else random in the step
    loss_chunk: int = 256  # target tokens per lm_head chunk of the cross-entropy
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip the update
    output_dir: str = "runs/sft"
    log_every: int = 1  # SFT: metrics.jsonl / TensorBoard interval (steps; values are its means); GRPO: 1 only
    progress_bar: bool = True
    tensorboard: bool = True  # write TensorBoard events when a writer is installed
    profile_steps: int = 0  # updates (GRPO: steps) to trace with jax.profiler into <output_dir>/profile (0: off)
    profile_start: int = 2  # the first traced update, 0-based over the run (the ones before, compilation among them, are not)

    def validate(self, where: str) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"{where}: set exactly one of train.steps and train.epochs")
        if self.steps is not None:
            check_positive(self.steps, f"{where}.steps")
        if self.epochs is not None and not 0 < self.epochs < float("inf"):
            raise ConfigError(f"{where}.epochs: must be positive and finite, got {self.epochs}")
        self.validate_all_but_length(where)

    def validate_all_but_length(self, where: str) -> None:
        """Every check but steps / epochs (GRPO's steps come from its stages; grpo_config checks those)."""
        check_seed(self.seed, f"{where}.seed")
        check_positive(self.loss_chunk, f"{where}.loss_chunk")
        check_positive(self.log_every, f"{where}.log_every")
        for name in ("profile_steps", "profile_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class CheckpointSection:
    dir: str | None = None  # default: <train.output_dir>/checkpoints
    every: int = 500  # save every N steps (and always at the end); 0: only at the end
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True
    resume: bool = True  # continue from the latest checkpoint in dir when there is one
    # Several processes: how long each waits at the start to see the file process 0 writes in dir (a network
    # file system's caches may show a new file late), before calling the folder not shared.
    shared_folder_wait: float = 30.0

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be >= 0, got {self.every}")
        check_positive(self.keep, f"{where}.keep")
        if not self.shared_folder_wait >= 0:
            raise ConfigError(f"{where}.shared_folder_wait: must be >= 0 seconds, got {self.shared_folder_wait}")


@dataclass(frozen=True)
class EvalSection:
    every: int = 0  # evaluate every N steps (0: only at_start / at_end)
    at_start: bool = False
    at_end: bool = True
    max_examples: int | None = None  # first N held-out examples (None: all)
    batch_size: int = 8
    generate: bool = True  # greedy decoding -> format rate, verdict accuracy, mean IoU
    max_new_tokens: int = 512

    def validate(self, where: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{where}.every: must be >= 0, got {self.every}")
        check_positive(self.batch_size, f"{where}.batch_size")
        check_positive(self.max_new_tokens, f"{where}.max_new_tokens")
        if self.max_examples is not None:  # (0 read as "all", -1 dropped the last example)
            check_positive(self.max_examples, f"{where}.max_examples")


@dataclass(frozen=True)
class ExportSection:
    merged_dir: str | None = None  # write base + LoRA merged as an HF checkpoint at the end
    adapter_dir: str | None = None  # write the LoRA adapter as a PEFT adapter directory at the end
