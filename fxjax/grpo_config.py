"""The GRPO run configuration: the SFT sections (model, lora, mesh, data, optim, train, checkpoint, eval,
export) plus `grpo` (sampling and the loss, TRL's names) and `stages` (the reward stages in order).

    cfg = load_grpo_config("configs/grpo.yaml", overrides=["grpo.num_generations=8"])

Loading is as strict as SFT's (fxjax.train_config): unknown keys and mistyped values are errors naming
the key; `--set` overrides follow the same rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

from fxjax.config_mapping import ConfigError, build_config, check_positive, check_seed, load_yaml
from fxjax.rewards.scoring import KEYS as SCORE_KEYS
from fxjax.rewards.stages import RewardWeights
from fxjax.config_sections import EvalSection, TrainSection, steps_for_epochs
from fxjax.run_files import expand_home, step_or_stage
from fxjax.train_config import RunConfig, load_config_as

__all__ = ["GRPOConfig", "GRPOSection", "StageSection", "load_grpo_config", "grpo_from_dict"]

@dataclass(frozen=True)
class RewardFuncSection:
    """A reward term of your own, added to the paper's reward (TRL's reward_funcs): `function`, "module:name"
    importable where the run runs, is called on each step's completions and returns one number per
    completion; the step's total reward gains `weight` x that number, in every stage (a function that takes
    `step` or `stage` can shape its number over the run: fxjax.train.reward_funcs)."""

    name: str = ""
    function: str = ""
    weight: float = 1.0

    BUILT_IN: ClassVar[tuple[str, ...]] = SCORE_KEYS  # rewards.score's terms
    # (TRL's reward_funcs are callables or model names: a list of those read "expected a mapping" alone)
    NOT_A_MAPPING: ClassVar[str] = (": a term of your own is {name: ..., function: \"package.module:function\", "
                                    "weight: ...}; the paper's format, verdict and IoU terms are built in "
                                    "(grpo.reward_config and the stages), not named here")
    WEIGHTS: ClassVar[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(RewardWeights))

    def validate(self, where: str) -> None:
        if not self.name.isidentifier():
            raise ConfigError(f"{where}.name: give a name such as brevity (letters, digits, _), got {self.name!r}")
        if self.name in self.BUILT_IN:
            raise ConfigError(f"{where}.name: {self.name!r} is a reward term of the paper's reward "
                              f"({', '.join(self.BUILT_IN)}); name yours otherwise")
        if self.name in self.WEIGHTS:  # (its weight is logged as weights/<name>, beside the stage's)
            raise ConfigError(f"{where}.name: {self.name!r} is a weight of the paper's reward "
                              f"({', '.join(self.WEIGHTS)}); name yours otherwise")
        module, _, attr = self.function.partition(":")
        if not module or not attr:
            raise ConfigError(f"{where}.function: give it as \"package.module:function\", got {self.function!r}")
        if not math.isfinite(self.weight):
            raise ConfigError(f"{where}.weight: must be a finite number, got {self.weight}")


@dataclass(frozen=True)
class StageSection:
    """One reward stage: a preset of the reward config (alpha, beta, gamma) for `steps` sampling steps (each
    grpo.num_iterations updates), or for `epochs` passes over data.train_files (the paper: one epoch a
    stage), which the run turns into steps once it has read the records (GRPOConfig.with_stage_steps)."""

    name: str = "alpha"
    steps: int | None = None
    epochs: float | None = None

    def validate(self, where: str) -> None:
        if not self.name:
            raise ConfigError(f"{where}.name: give a stage of the reward config (alpha, beta, gamma)")
        if isinstance(step_or_stage(str(self.name)), int):  # (`--step 2` is a step; a stage is named)
            raise ConfigError(f"{where}.name: {self.name!r} is a number; a stage is named (alpha, beta, gamma)")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"{where}: give exactly one of steps (sampling steps) and epochs (passes over "
                              f"data.train_files), got steps={self.steps}, epochs={self.epochs}")
        if self.steps is not None:
            check_positive(self.steps, f"{where}.steps")
        elif not 0 < self.epochs < float("inf"):
            raise ConfigError(f"{where}.epochs: must be positive and finite, got {self.epochs}")

    def steps_for(self, records: int, batch_size: int) -> int:
        """This stage's sampling steps over `records` training prompts, `batch_size` of them a step: its
        steps, or its epochs rounded up to whole steps (as SFT rounds train.epochs)."""
        if self.steps is not None:
            return int(self.steps)
        return steps_for_epochs(self.epochs, records, batch_size)


@dataclass(frozen=True)
class GRPOSection:
    """Group sampling and the GRPO loss, with TRL's GRPOConfig names and meanings."""

    # TRL 1.16 takes scale_rewards true / false too (its "group" / "none"): a TRL config loads as it means
    VALUE_ALIASES: ClassVar[dict[str, tuple]] = {"scale_rewards": ((True, "group"), (False, "none"))}

    num_generations: int = 4  # G completions per prompt (the paper: 4)
    max_completion_length: int = 512  # new tokens per completion; longer ones are cut and flagged truncated
    temperature: float = 1.0  # sampling temperature; log-probs are taken from logits / temperature as TRL
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    top_k: int = 0  # top-k sampling (0: off)
    # TRL 1.16's loss types but vespo (fxjax.train.grpo_loss.LOSS_TYPES): grpo, bnpo, dr_grpo and dapo differ in
    # how token losses are averaged; luspo scales each sequence's loss by its length (with
    # importance_sampling_level: sequence, as its paper); cispo clips the ratio as a detached weight at
    # epsilon_high (absolute: TRL recommends 5.0); sapo gates the ratio smoothly (the two temperatures below)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"] = "grpo"
    epsilon: float = 0.2  # lower clip of the ratio (1 - epsilon)
    epsilon_high: float | None = None  # upper clip (1 + epsilon_high); null: epsilon; cispo: the ratio's cap
    sapo_temperature_pos: float = 1.0  # sapo: the gate's temperature for tokens of positive advantage
    sapo_temperature_neg: float = 1.05  # sapo: ... of non-positive advantage
    delta: float | None = None  # two-sided clipping of the unclipped term (null: off)
    beta: float = 0.04  # weight of the k3 KL to the reference policy (the base model, LoRA off); 0: no reference pass
    # the k3 KL multiplied by the importance ratio (TRL 1.16's default); false: the plain k3 of the paper
    use_bias_correction_kl: bool = True
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False  # completions without EOS add nothing to the loss
    num_iterations: int = 1  # updates per generation batch (> 1 stores old log-probs)
    # The update runs each prompt through the decoder once, its G completions attending to its keys and
    # values, instead of G full sequences: the same loss up to float rounding, up to G times fewer decoder
    # tokens; with LoRA dropout the G completions share the prompt's dropout masks; on a TPU these passes
    # use the cache attention (xla), full sequences Splash.
    share_prompts: bool = True
    schedule: Literal["stages", "continuous"] = "stages"  # continuous: w_G(t) over train.steps
    reward_config: str | None = None  # reward YAML (default: configs/rewards.yaml of the repository)
    seed: int = 0  # sampling seed; step k samples with a key folded from (seed, k)
    # every sampled completion, its rewards and advantage to <train.output_dir>/completions.jsonl (TRL's
    # log_completions); logging only: a resumed run may change it
    log_completions: bool = False
    # reward terms of your own (RewardFuncSection: name, function "module:name", weight), TRL's reward_funcs
    reward_funcs: tuple[RewardFuncSection, ...] = ()

    def validate(self, where: str) -> None:
        for name in ("num_generations", "max_completion_length", "num_iterations"):
            check_positive(getattr(self, name), f"{where}.{name}")
        for name in ("temperature", "top_p", "epsilon", "epsilon_high", "beta", "delta"):
            value = getattr(self, name)  # (NaN passes every comparison's negation test; inf passes most)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{where}.{name}: must be a finite number, got {value}")
        check_seed(self.seed, f"{where}.seed")
        if self.num_generations < 2:  # one sample per prompt: every advantage is 0, nothing is learned
            raise ConfigError(f"{where}.num_generations: must be >= 2 (the advantage compares a prompt's "
                              f"completions with each other), got {self.num_generations}")
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature: must be positive (GRPO samples), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"{where}.top_k: must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 <= self.epsilon < 1.0:
            raise ConfigError(f"{where}.epsilon: must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:  # below 0 the clip range turns over
            raise ConfigError(f"{where}.epsilon_high: must be >= 0 or null, got {self.epsilon_high}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{where}.{name}: must be a positive number, got {getattr(self, name)}")
        if self.beta < 0:
            raise ConfigError(f"{where}.beta: must be >= 0, got {self.beta}")
        if self.delta is not None and not self.delta > 1.0:
            raise ConfigError(f"{where}.delta: must be > 1 (a ratio bound) or null, got {self.delta}")
        for i, func in enumerate(self.reward_funcs):
            func.validate(f"{where}.reward_funcs[{i}]")
        names = [f.name for f in self.reward_funcs]
        if len(set(names)) < len(names):
            raise ConfigError(f"{where}.reward_funcs: each needs a name of its own, got {names}")


def read_reward_config(path: str | None) -> dict:
    """The reward config a GRPO run scores with (grpo.reward_config; None: the shipped configs/rewards.yaml),
    read as the run configs are (fxjax.config_mapping.load_yaml: a key given twice, the second of which won,
    is an error, and 010 or 1:30 are the integers YAML 1.2 reads, not YAML 1.1's 8 and 90) and checked key
    by key (rewards.load_config), every error naming the file."""
    from fxjax.rewards.stages import load_config

    return load_config(path, parse=load_yaml)


def _default_stages() -> tuple[StageSection, ...]:
    return (StageSection("alpha", 100), StageSection("beta", 100), StageSection("gamma", 100))


@dataclass(frozen=True)
class GRPOTrainSection(TrainSection):
    """SFT's train section with GRPO's own output folder: its default applies also when a `train:` section
    is given without output_dir (a default_factory on GRPOConfig.train covered only a missing section, and
    such a run wrote into runs/sft)."""

    output_dir: str = "runs/grpo"


@dataclass(frozen=True)
class GRPOEvalSection(EvalSection):
    """SFT's eval section plus the held-out evaluation at each reward stage's end: the model after alpha,
    after beta, ... in metrics.jsonl and the report, however the stages fall against eval.every."""

    at_stage_ends: bool = True  # with data.eval_files and staged rewards (the last stage's end is at_end's)


# (hints shared by a TRL key and a family of them, below)
_OWN_DECODER = "not supported: sampling runs in fxjax's own jitted decoder (KV cache), under the run's mesh"
_NO_ENTROPY_BONUS = "not supported: no entropy bonus (the entropy is logged)"


@dataclass(frozen=True)
class GRPOConfig(RunConfig):
    """The `fxjax grpo` config: the run sections of SFT plus `grpo` and `stages` (configs/grpo.yaml)."""

    FOREIGN_KEYS: ClassVar[dict[str, str]] = {  # TRL's GRPOConfig names (README, "Coming from TRL")
        **RunConfig.FOREIGN_KEYS,
        "per_device_train_batch_size": "here data.batch_size, in prompts: each is sampled grpo.num_generations "
                                       "times; TRL's counts completions per device: data.batch_size = "
                                       "per_device_train_batch_size x devices x gradient_accumulation_steps / "
                                       "num_generations",
        "gradient_accumulation_steps": "here optim.grad_accum, which splits data.batch_size into micro-batches "
                                       "where TRL's multiplies the batch: fold it into data.batch_size",
        "max_steps": "here each stage's stages[i].steps, or train.steps with grpo.schedule=continuous: sampling "
                     "steps, each grpo.num_iterations updates, where TRL's max_steps counts updates: divide it by "
                     "num_iterations",
        "save_steps": "here checkpoint.every, in sampling steps (each grpo.num_iterations updates; TRL counts "
                      "updates)",
        "eval_steps": "here eval.every, in sampling steps; the held-out evaluation decodes one greedy answer per "
                      "image and scores format, verdict and IoU (TRL's samples num_generations_eval and logs their "
                      "reward)",
        "reward_weights": "here each stage's weights (grpo.reward_config, configs/rewards.yaml) and "
                          "grpo.reward_funcs[i].weight for terms of your own",
        "multi_objective_aggregation": "here the terms are summed, then normalised in the group (TRL's "
                                       "sum_then_normalize); normalize_then_sum is not supported",
        **dict.fromkeys(("generation_batch_size", "steps_per_generation"),
                        "not supported: a step samples data.batch_size prompts x grpo.num_generations and updates on "
                        "them (grpo.num_iterations times), without off-policy mini-batches"),
        "num_generations_eval": "not supported: the held-out evaluation decodes one greedy answer per image",
        **dict.fromkeys(("min_p", "repetition_penalty", "generation_kwargs"),
                        "not supported: sampling takes grpo.temperature, top_k and top_p"),
        "top_entropy_quantile": "not supported: every completion token is in the loss (the entropy is logged)",
        "off_policy_mask_threshold": "not supported: the completions are sampled by the policy being updated",
        **dict.fromkeys(("sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha"),
                        "not supported: the reference is the base model (LoRA off), fixed"),
        "use_vllm": _OWN_DECODER,
        "vllm_importance_sampling_correction": "not needed: the completions are sampled by the policy's own "
                                               "decoder, its log-probs those of the update",
        "cast_lm_head_to_fp32": "here the log-probs always come from float32 logits",
        **dict.fromkeys(("num_completions_to_print", "log_unique_prompts"),
                        "here grpo.log_completions writes every sampled completion to completions.jsonl"),
        "log_multimodal": "here grpo.log_completions writes every sampled completion to completions.jsonl (with "
                          "its record's id, not the image)",
        "log_completions_hub_repo": "not supported: nothing is uploaded (grpo.log_completions: completions.jsonl)",
        "model_init_kwargs": "here the model section (path, dtype, param_dtype, attention)",
        "trust_remote_code": "not needed: Qwen2.5-VL is fxjax's own model",
        "router_aux_loss_coef": "not supported: Qwen2.5-VL has no router (it is not a mixture of experts)",
        "ds3_gather_for_generation": "here mesh.gather_for_decoding (auto, always, never; true / false as TRL's): "
                                     "weights split over mesh.fsdp gathered once per rollout",
        "pad_to_multiple_of": "here data.length_buckets (prompts) and the decoder's own completion padding",
        "chat_template_kwargs": "not supported: the tokenizer's chat template, with data.system_prompt and "
                                "data.user_prompt",
        "cache_implementation": "not needed: sampling uses fxjax's own KV cache",
        "use_adaptive_entropy": _NO_ENTROPY_BONUS,
        "max_tool_calling_iterations": "not supported: no tool calls",
        "num_train_epochs": "here each stage's stages[i].epochs",
        "logging_steps": "here every step is logged",
        "max_prompt_length": "here data.max_length (prompt tokens, image tokens included)",
    }
    # TRL's families of keys (its vLLM server, VESPO's loss, the entropy controller, transformers' batching)
    FOREIGN_PREFIXES: ClassVar[dict[str, str]] = {
        "vllm_": _OWN_DECODER,
        "vespo_": "not supported: loss_type vespo is not here (TRL 1.16's other seven are: grpo.loss_type)",
        "entropy_": _NO_ENTROPY_BONUS,
        "use_transformers_": "not needed: sampling runs in fxjax's own jitted decoder (KV cache)",
        "transformers_continuous_batching": "not needed: sampling runs in fxjax's own jitted decoder (KV cache)",
    }

    train: GRPOTrainSection = field(default_factory=GRPOTrainSection)
    eval: GRPOEvalSection = field(default_factory=GRPOEvalSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    stages: tuple[StageSection, ...] = field(default_factory=_default_stages)

    def validate(self) -> "GRPOConfig":
        self.validate_sections(skip=("train",))  # steps come from the stages unless the schedule is continuous
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages[{i}]")
            first = next(j for j, other in enumerate(self.stages) if other.name == stage.name)
            if first != i:  # (`--step alpha` names the end of one stage; two in a row are one longer stage)
                raise ConfigError(f"stages[{i}].name: {stage.name!r} is stages[{first}]'s name too; each stage needs "
                                  f"its own name (its end is a checkpoint --step and model.from_run_step name): "
                                  f"give one {stage.name} stage the steps of both")
        if self.grpo.schedule == "stages":
            if not self.stages:
                raise ConfigError("stages: give at least one stage (or grpo.schedule=continuous with train.steps)")
            if self.train.steps is not None or self.train.epochs is not None:
                key = "train.steps" if self.train.steps is not None else "train.epochs"
                raise ConfigError(f"{key}: with grpo.schedule=stages the steps are the stages' (a stage takes steps "
                                  f"or epochs: stages[i].steps / stages[i].epochs); set {key}=null")
        elif self.train.steps is None:
            raise ConfigError("train.steps: grpo.schedule=continuous needs train.steps (the T of w_G(t))")
        elif self.train.epochs is not None:
            raise ConfigError("train.epochs: grpo.schedule=continuous runs train.steps; set train.epochs=null")
        else:
            check_positive(self.train.steps, "train.steps")
        self.train.validate_all_but_length("train")  # the rest of the train section as SFT checks it
        if self.optim.grad_accum != 1 and self.data.batch_size % self.optim.grad_accum:
            raise ConfigError(f"optim.grad_accum: {self.optim.grad_accum} must divide data.batch_size "
                              f"({self.data.batch_size} prompts per step): micro-batches hold whole groups")
        return self

    def with_stage_steps(self, records: int) -> "GRPOConfig":
        """This config with every stage's length in steps: a stage given in epochs gets the steps they take
        over `records` training prompts (data.batch_size a step). The run calls it once it has read its
        records; what a checkpoint records stays the config as given."""
        if self.grpo.schedule == "continuous" or all(s.epochs is None for s in self.stages):
            return self
        if records <= 0:
            raise ConfigError("stages: a stage given in epochs needs training records, and data.train_files "
                              "holds none")
        stages = tuple(dataclasses.replace(s, steps=s.steps_for(records, self.data.batch_size), epochs=None)
                       for s in self.stages)
        return dataclasses.replace(self, stages=stages)

    def _stage_steps(self) -> list[int]:
        unresolved = [s.name for s in self.stages if s.steps is None]
        if unresolved:  # (a programming error: the run resolves epochs before it counts steps)
            raise ValueError(f"stages {unresolved} are given in epochs: call with_stage_steps(records) first")
        return [int(s.steps) for s in self.stages]

    @property
    def total_steps(self) -> int:
        if self.grpo.schedule == "continuous":
            return int(self.train.steps)
        return sum(self._stage_steps())

    def stage_ends(self) -> tuple[tuple[str, int], ...]:
        """(stage name, the step count after its last step) of each stage in order; () when continuous.
        The run saves a checkpoint at each and keeps it from pruning (`--step NAME` of eval, detect, export)."""
        if self.grpo.schedule == "continuous":
            return ()
        ends, end = [], 0
        for stage, steps in zip(self.stages, self._stage_steps()):
            end += steps
            ends.append((stage.name, end))
        return tuple(ends)

    def stage_at(self, step: int) -> tuple[int, StageSection | None]:
        """(stage index, stage) of the sampling step numbered `step` (0-based); (0, None) when continuous."""
        if self.grpo.schedule == "continuous":
            return 0, None
        end = 0
        for i, (stage, steps) in enumerate(zip(self.stages, self._stage_steps())):
            end += steps
            if step < end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]


def refuse_grpo_log_every(cfg: GRPOConfig) -> GRPOConfig:
    """train.log_every, SFT's interval, refused other than 1 in a GRPO run to start (GRPO logs every step: it
    was taken and did nothing). Here, not in `validate`: a run saved before with another value still loads
    (its export, eval and resume)."""
    if cfg.train.log_every != 1:
        raise ConfigError(f"train.log_every: {cfg.train.log_every}, but GRPO logs every step (each a mean over its "
                          f"completions; the interval is SFT's): leave it out or set 1")
    return cfg


def grpo_from_dict(data: Mapping[str, Any]) -> GRPOConfig:
    """A plain mapping (parsed YAML, sections as keys) -> validated GRPOConfig (a leading ~ of a path is the
    home folder, as in a file `load_grpo_config` reads). train.log_every other than 1 is taken here, where a
    saved run's config is read back, and refused by run_grpo (`refuse_grpo_log_every`)."""
    plain = expand_home(dict(data)) if isinstance(data, Mapping) else data
    return build_config(GRPOConfig, plain, "").validate()


def load_grpo_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                     base: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] | None = None) -> GRPOConfig:
    """YAML file (optional) + ``key=value`` overrides -> validated GRPOConfig (`refuse_grpo_log_every`)."""
    return refuse_grpo_log_every(load_config_as(GRPOConfig, path, overrides, base=base, log=log))
