"""The model options `fxjax eval` and `fxjax detect` share, and loading the detector they name.

    --model PATH [--adapter DIR]          an HF directory (a merged export, or a base model + PEFT adapter)
    --run RUN_DIR [--step N|STAGE] [--model P]  a fxjax sft/grpo run at a checkpoint step or a GRPO stage's
                                          end (P: its base, if moved)

plus --dtype, --mesh and --tokenizer. The prompt settings (pixel limits, system prompt, prompt source,
max length) default to the run's data config with --run, and otherwise to what training used as its export
recorded it (fxjax_prompt_settings.json in the adapter or merged directory), else to the pipeline's defaults
with the pixel limits of the model directory's preprocessor_config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxjax.commands.arg_types import positive_int
from fxjax.export_record import OtherBaseWarning, other_base_note
from fxjax.run_files import is_adapter_not_model, is_export_folder, is_run_folder, runs_inside, step_or_stage

__all__ = ["Detector", "add_model_arguments", "add_prompt_arguments", "check_model_arguments",
           "mesh_from_flag", "parse_mesh", "resolve_detector"]


def add_model_arguments(p: argparse.ArgumentParser, several_steps: bool = False) -> None:
    """--model / --adapter / --run / --step ...; `several_steps`: --step takes one or more (fxjax eval)."""
    g = p.add_argument_group("model (give --model, or --run)")
    g.add_argument("--model", metavar="PATH",
                   help="HF Qwen2.5-VL directory: a merged export (fxjax export), or the base model for --adapter; "
                        "with --run, the run's base model when it is no longer where the run read it")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--adapter", metavar="DIR",
                     help="PEFT LoRA adapter directory to apply on --model (refused when --model is an export with "
                          "this adapter already merged)")
    src.add_argument("--run", metavar="RUN_DIR",
                     help="a fxjax sft/grpo run: its train.output_dir (holding checkpoints/) or a checkpoint.dir; "
                          "the model is rebuilt from the run's saved config with the LoRA of --step")
    several = ("; several (--step alpha beta gamma, or --step 100 --step 200): each is evaluated into "
               "--out/<stage> or --out/step-N, one after the other on the same loaded base model (only each "
               "step's LoRA is read), then compared in a table and --out/eval_report.png") if several_steps else ""
    g.add_argument("--step", type=step_or_stage, metavar="N|STAGE", nargs="+" if several_steps else None,
                   action="extend" if several_steps else "store",
                   help="checkpoint step of --run, or a GRPO stage's name (alpha, beta, gamma): the checkpoint "
                        "at that stage's end (default: the newest)" + several)
    g.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: the run's with --run, else float32)")
    g.add_argument("--mesh", metavar="AXES",
                   help="device mesh, e.g. fsdp=4 or fsdp=2,tensor=2 (axes data, fsdp, tensor; one may be -1; "
                        "data takes the devices the others leave unless given); "
                        "batches are split over data x fsdp (default: with --run the run's fsdp and tensor axes, "
                        "with --model none; the other devices on the data axis); sizes that multiply to fewer "
                        "devices than there are take the first ones (data=1: one device)")
    g.add_argument("--gather-for-decoding", choices=("auto", "always", "never"),
                   help="with weights split over fsdp (--mesh, or a --run's split): gather them once before "
                        "decoding rather than in every generated token's step (default: a --run's own "
                        "mesh.gather_for_decoding, else auto: when the copy takes at most half of the devices' "
                        "free memory)")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json (default: the model directory, or the run's tokenizer)")


def add_image_limit_argument(p) -> None:
    """--max-image-pixels, for commands that read images (the limit's error names it)."""
    p.add_argument("--max-image-pixels", type=positive_int, metavar="N",
                   help="refuse images of more pixels than this, before decoding them (a decompression-bomb "
                        "guard; default: 89478485, PIL's)")


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt and image size", "default: the run's data config with --run, else the "
                             "export's fxjax_prompt_settings.json,\nthen the model directory's "
                             "preprocessor_config.json and fxjax's defaults")
    g.add_argument("--min-pixels", type=positive_int, metavar="N", help="smallest model-input image area (pixels)")
    g.add_argument("--max-pixels", type=positive_int, metavar="N",
                   help="largest model-input image area (pixels); fewer pixels = fewer image tokens, faster")
    g.add_argument("--max-length", type=positive_int, metavar="N",
                   help="longest prompt in tokens, image tokens included (default: the run's data.max_length, "
                        "else the export's recorded one, else 8192); an image whose tokens would not fit is "
                        "shrunk to fit (eval: as the run's data.long_images says; shrink by default)")
    g.add_argument("--system-prompt", metavar="TEXT", help="system prompt (default: the one SFT trained with)")
    g.add_argument("--user-prompt", metavar="TEXT",
                   help="one user prompt for every image (default: the one SFT trained with; when it trained on "
                        "the nine templates of fxjax.data.prompts: eval gives each record one of them, seeded, "
                        "detect the first)")


def parse_mesh(text: str | None):
    if not text:
        return None
    from fxjax.device_mesh import MeshConfig

    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in ("data", "fsdp", "tensor"):
            raise ValueError(f"--mesh: {part!r} is not AXIS=N with AXIS one of data, fsdp, tensor")
        if name in sizes:
            raise ValueError(f"--mesh: {name} is given twice ({name}={sizes[name]}, {part.strip()}); give it once")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: {value!r} is not an integer") from None
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--mesh: at most one axis may be -1 (the rest of the devices), got {text}")
    # as a run config's mesh (--mesh fsdp=4 on 8 devices is data=2 x fsdp=4; it was an error that 4 devices
    # are not 8)
    return MeshConfig.data_takes_rest(**sizes)


def mesh_from_flag(text: str | None):
    """The jax Mesh a --mesh flag names (`parse_mesh`), or None when it is not given."""
    mesh_cfg = parse_mesh(text)
    if mesh_cfg is None:
        return None
    import jax

    from fxjax.device_mesh import make_mesh

    given = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    if given > 0 and given < jax.device_count():  # every size given, fewer devices: the first ones (data=1: one)
        return make_mesh(mesh_cfg, devices=jax.devices()[:given])
    return make_mesh(mesh_cfg)


@dataclass
class Detector:
    """What `--model` / `--run` name, resolved without loading any weights (`load()` loads them)."""

    args: argparse.Namespace
    tokenizer: str  # directory (or file) holding tokenizer.json
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig fields: pixels, prompts, system prompt, ...
    source: dict[str, Any] = field(default_factory=dict)  # what is loaded, for the record (settings, metrics)
    max_new_tokens: int = 1024  # no --max-new-tokens: the run's eval.max_new_tokens (or its export's record), else this
    run_mesh: Any = None  # with --run: the run's mesh section (how it split the model)
    model: Any = None  # after load()
    mesh: Any = None  # after load(): jax Mesh, or None for one device
    loaded_run: Any = None  # after load() of a --run: its fxjax.train.run_loading.LoadedRun

    def _say(self, text: str) -> None:
        print(f"fxjax {self.args.command}: {text}", file=sys.stderr, flush=True)

    def placement(self):
        """The mesh the weights will go on (made once, before any weights load): --mesh; else with --run the
        run's split of the model (its fsdp and tensor axes, `run_mesh`), with --model every device on the
        data axis; the other devices on the data axis, each decoding its share of a batch."""
        if self.mesh is None and not getattr(self, "_placed", False):
            self.mesh = mesh_from_flag(getattr(self.args, "mesh", None))
            if self.mesh is None:
                from fxjax.train.run_loading import data_parallel_mesh, run_mesh

                self.mesh = run_mesh(self.run_mesh, self._say) if self.run_mesh is not None else data_parallel_mesh()
            self._placed = True
        return self.mesh

    def batch_size(self, given: int | None, default: int) -> int:
        """--batch-size checked against the mesh before anything loads; not given: `default` rounded up to a
        multiple of the mesh's batch devices, so every device decodes its share."""
        from fxjax.device_mesh import batch_shards, require_batch_split

        mesh = self.placement()
        if given is None:
            n = batch_shards(mesh) if mesh is not None else 1
            return -(-default // n) * n
        if mesh is not None:
            require_batch_split(mesh, given, "--batch-size")
        return given

    def load(self, after: "Detector | None" = None) -> "Detector":
        """Load the weights (once) and place them; returns self. `after`: a loaded detector of another step of
        the same --run, whose model takes this step's LoRA (`load_run_step`: the base is not read again);
        `after` gives its model up (its `model` is None after), so one model is held whatever the steps."""
        if self.model is not None:
            return self
        args = self.args
        say = self._say
        if args.run is not None and after is not None and after.loaded_run is not None:
            from fxjax.train.run_loading import load_run_step

            previous, after.model, after.loaded_run = after.loaded_run, None, None
            self.loaded_run = load_run_step(previous, self.source["step"], log=say)
            self.model, self.mesh, self._placed = self.loaded_run.model, self.loaded_run.mesh, True
            return self
        mesh = self.placement()
        if args.run is not None:
            from fxjax.train.run_loading import load_run

            # attention "auto": the kernel this platform and dtype run best, not the run's (a cudnn run
            # evaluated on a CPU, or in float32 with --dtype)
            self.loaded_run = load_run(args.run, self.source["step"], mesh=mesh, model_path=args.model,
                                       dtype=args.dtype, attention="auto", log=say)
            self.model = self.loaded_run.model
        else:
            from fxjax.hf_checkpoint import from_pretrained

            say(f"loading {args.model}" + (f" with the adapter {args.adapter}" if args.adapter else "")
                + f" ({self.source['dtype']}" + (f", on mesh {dict(mesh.shape)})" if mesh is not None else ")"))
            with warnings.catch_warnings():  # (said as a note when the options were read: resolve_detector)
                warnings.simplefilter("ignore", OtherBaseWarning)
                self.model = from_pretrained(args.model, dtype=self.source["dtype"], mesh=mesh, adapter=args.adapter)
            self.model.eval()
        return self

    def gather_setting(self) -> tuple[str, str]:
        """(mesh.gather_for_decoding's value for decoding, where it comes from): --gather-for-decoding, else a
        --run's own setting, else auto."""
        given = getattr(self.args, "gather_for_decoding", None)
        if given is not None:
            return given, "--gather-for-decoding"
        recorded = getattr(self.run_mesh, "gather_for_decoding", None)
        if recorded is not None:
            return recorded, "the run's mesh.gather_for_decoding"
        return "auto", "--gather-for-decoding"

    def decoder(self, batch_size: int, max_new_tokens: int, after: "Detector | None" = None):
        """The greedy decoder of this detector's model (its weights loaded first, `after` as for `load`), made
        once for these settings: `fxjax eval` and `fxjax detect` on the same detector (the demo's phases)
        share its compiled programs."""
        made = getattr(self, "_decoder", None)
        if made is None or (made.batch_size, made.max_new_tokens) != (batch_size, max_new_tokens):
            from fxjax.train.inference import GreedyDecoder

            self.load(after=after)
            setting, source = self.gather_setting()
            self._decoder = GreedyDecoder(self.model, self.tokenizer, batch_size=batch_size,
                                          max_new_tokens=max_new_tokens, mesh=self.mesh, say=self._say,
                                          gather_for_decoding=setting, gather_source=source)
        return self._decoder


def _pixels_of(model_dir: Path) -> dict[str, int]:
    path = model_dir / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: int(config[k]) for k in ("min_pixels", "max_pixels") if isinstance(config.get(k), int)}


def check_model_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model: run them before anything slow."""
    if args.run is None and args.model is None:
        raise ValueError("give --model PATH (an HF directory, optionally with --adapter DIR) or --run RUN_DIR")
    if args.step is not None and args.run is None:
        raise ValueError("--step needs --run")
    for name in ("model", "adapter", "tokenizer", "run"):
        value = getattr(args, name, None)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name}: {value} does not exist")
        if value is not None and name != "tokenizer" and not Path(value).is_dir():
            what = {"model": "an HF model directory", "adapter": "a PEFT adapter directory",
                    "run": "a training run's directory"}[name]
            raise NotADirectoryError(f"--{name}: {value} is a file; give {what}")
    model = Path(args.model) if args.model is not None else None
    if model is not None and is_adapter_not_model(model):
        raise ValueError(f"--model: {model} is a PEFT adapter, not a model: pass --model BASE_MODEL_DIR "
                         f"--adapter {model}")
    if model is not None and is_export_folder(model) and (model / "merged" / "config.json").is_file():
        raise ValueError(f"--model: {model} is the folder of an `fxjax export` (merged/ and adapter/ in it): pass "
                         f"--model {model / 'merged'}, or the base model with --adapter {model / 'adapter'}")
    if model is not None and args.run is None:
        _require_model_folder(model)
    if model is not None and getattr(args, "adapter", None) is not None:
        from fxjax.merged_lora import refuse_stacked_adapter

        refuse_stacked_adapter(model, Path(args.adapter), f"--adapter: {args.adapter}")
    parse_mesh(getattr(args, "mesh", None))


def _require_model_folder(model: Path) -> None:
    """--model names an HF model's folder (config.json in it): a run's folder, or a folder of runs, said as
    such (it was asked for a tokenizer: "no tokenizer.json in runs/sft; pass --tokenizer DIR")."""
    if (model / "config.json").is_file():
        return
    if is_run_folder(model):
        raise ValueError(f"--model: {model} is an fxjax training run, not an HF model: pass --run {model} "
                         f"(and --step N or a stage's name for another step than the last)")
    raise ValueError(f"--model: {model} holds no config.json: not an HF model folder (the one with config.json "
                     f"and *.safetensors){runs_inside(model)}")


def resolve_detector(args: argparse.Namespace) -> Detector:
    """The detector the options name: tokenizer, prompt settings and what will be loaded (the run's step
    resolved, its config read), without loading weights."""
    from fxjax.config_sections import DataSection
    from fxjax.data.formats import check_prompt
    from fxjax.export_record import read_export_record
    from fxjax.train.export import PROMPT_SETTING_KEYS, PROMPT_SETTINGS_FILE, read_prompt_settings

    check_model_arguments(args)
    data: dict[str, Any] = {key: getattr(DataSection(), key) for key in PROMPT_SETTING_KEYS}
    exported: dict[str, Any] = {}  # (--model / --adapter: their export's record)
    if args.run is not None:
        from fxjax.config_mapping import ConfigError
        from fxjax.run_files import checkpoint_dir_of, resolve_step
        from fxjax.train.run_loading import check_run_paths, config_as_loaded
        from fxjax.train_config import base_model_section

        ckpt = checkpoint_dir_of(args.run).absolute()
        step, cfg, kind = resolve_step(ckpt, args.step)
        # as load_run resolves it: --model moves the base (and a data.tokenizer that was the base follows
        # it); a run started from another (model.from_run): that run's tokenizer and base, or the run's own
        # record of them when that run is not here
        cfg = config_as_loaded(cfg, ckpt, args.model)
        check_run_paths(cfg, ckpt)  # (a base model that is not here is named as itself, not as its tokenizer)
        data.update({key: getattr(cfg.data, key) for key in PROMPT_SETTING_KEYS})
        data["train_files"] = tuple(str(f) for f in cfg.data.train_files)  # (detect: were they ms-swift?)
        try:
            tokenizer = args.tokenizer or cfg.tokenizer
        except ConfigError:
            raise ValueError(f"the run in {ckpt} has no tokenizer (a preset model without data.tokenizer); "
                             f"pass --tokenizer DIR") from None
        base = base_model_section(cfg)
        source = {"run": str(ckpt), "step": step, "kind": kind,
                  "base": args.model or (base and (base.path or base.preset)), "dtype": args.dtype or cfg.model.dtype}
    else:
        model_dir = Path(args.model)
        data.update(_pixels_of(model_dir))
        # what training used, written by its export: the merged model's, then the adapter's
        trained = {**read_prompt_settings(model_dir), **(read_prompt_settings(args.adapter) if args.adapter else {})}
        data.update(trained)
        # the answer length the run evaluated with, as its export recorded it (the adapter's, then the model's)
        exported = read_export_record(args.adapter) if args.adapter else {}
        exported = exported or read_export_record(model_dir)
        tokenizer = args.tokenizer or str(model_dir)
        source = {"model": str(model_dir.resolve()), "adapter": str(Path(args.adapter).resolve()) if args.adapter
                  else None, "dtype": args.dtype or "float32",
                  "prompt_settings": "from the export" if trained else "fxjax defaults (no fxjax_prompt_settings.json)"}
    from fxjax.data.tokenizer import tokenizer_json

    if tokenizer_json(tokenizer) is None:
        if args.tokenizer:
            raise FileNotFoundError(f"--tokenizer: {args.tokenizer} " + ("holds no tokenizer.json" if
                                    Path(args.tokenizer).is_dir() else "is not a folder (one with tokenizer.json)"))
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer}; pass --tokenizer DIR")
    for key in ("min_pixels", "max_pixels", "max_length", "system_prompt", "user_prompt"):
        value = getattr(args, key, None)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{flag}: give a non-empty text (or leave {flag} out for the trained one)")
        if key.endswith("_prompt"):
            check_prompt(value, flag, user=key == "user_prompt")
        data[key] = value
    if data["min_pixels"] > data["max_pixels"]:  # (every image would fail to resize, one by one)
        raise ValueError(f"min_pixels {data['min_pixels']} is above max_pixels {data['max_pixels']} (--min-pixels, "
                         "--max-pixels, or the model's preprocessor_config.json / the run's data settings)")
    detector = Detector(args=args, tokenizer=str(tokenizer), data=data, source=source)
    if args.run is None and args.adapter and source["prompt_settings"].startswith("fxjax defaults"):
        given = [f for f in ("min_pixels", "max_pixels", "max_length", "system_prompt") if getattr(args, f, None)]
        if len(given) < 4:  # (an adapter saved by fxjax.save_peft_adapter, or by peft: how it trained is unknown)
            detector._say(f"note: {args.adapter} has no {PROMPT_SETTINGS_FILE} (`fxjax export` and "
                          "fxjax.train.export.save_adapter write it): the prompts are built with fxjax's defaults "
                          f"(pixels {data['min_pixels']}-{data['max_pixels']}, max length {data['max_length']}, "
                          "the paper's system prompt), which may not be what the adapter trained with; pass "
                          "--min-pixels, --max-pixels, --max-length and --system-prompt as it trained")
    other_base = other_base_note(args.adapter, args.model) if args.run is None and args.adapter else ""
    if other_base:  # (said here, before the weights load; from_pretrained's warning of it is left out)
        detector._say(f"note: {other_base}")
    if args.run is not None:
        detector.run_mesh = cfg.mesh
    if getattr(args, "max_new_tokens", None) is not None:
        detector.max_new_tokens = args.max_new_tokens
    elif args.run is not None:  # (the length the run's own evaluation decoded, not a guess of 1024)
        detector.max_new_tokens = cfg.eval.max_new_tokens
    elif isinstance(exported.get("max_new_tokens"), int) and exported["max_new_tokens"] > 0:
        detector.max_new_tokens = exported["max_new_tokens"]
    elif _generation_length(Path(args.model)):  # (a merged folder saved from Python: save_merged's max_new_tokens)
        detector.max_new_tokens = _generation_length(Path(args.model))
    return detector


def _generation_length(model_dir: Path) -> int | None:
    """The max_new_tokens of a model folder's generation_config.json, where it sets a positive one."""
    try:
        value = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("max_new_tokens")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
