"""`fxjax export --run RUN_DIR [--step N|STAGE] --out DIR`: a run's checkpoint as Hugging Face directories.

    checkpoint <step> -> (run config -> base model + LoRA, the step's LoRA parameters: train.run_loading)
      -> OUT/merged/   base + LoRA merged: config.json, safetensors, tokenizer, preprocessor_config.json
      -> OUT/adapter/  PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors, tokenizer,
                       preprocessor_config.json, fxjax_prompt_settings.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fxjax.file_modes import require_writable
from fxjax.run_files import step_or_stage

HELP = "write a run's checkpoint (SFT or GRPO, any step) as a merged HF checkpoint and a PEFT adapter"

DESCRIPTION = """\
Export any checkpoint of a fxjax sft / grpo run, from one process (also a checkpoint written by a
multi-process run):

  OUT/merged/   the base model with the LoRA merged into its weights (W + scaling * B A, computed in
                float32): a self-contained Hugging Face checkpoint that transformers'
                Qwen2_5_VLForConditionalGeneration loads without peft, with the tokenizer training used
                (the output-format markers included) and preprocessor_config.json with the run's pixel
                limits, so AutoTokenizer / AutoImageProcessor load it too (AutoProcessor with torchvision
                installed). In float32 its logits are fxjax's at that step (a bfloat16 export
                rounds the merged weights once more). fxjax_prompt_settings.json: the prompts training
                used ("serve": the system and user prompt to send; the README shows serving).
  OUT/adapter/  the LoRA as a PEFT adapter (peft.PeftModel.from_pretrained(base, OUT/adapter)); for a GRPO
                run started from an SFT adapter, that adapter's config with the GRPO step's weights. Beside
                it, as in merged/: the tokenizer training used, preprocessor_config.json and
                fxjax_prompt_settings.json (a server that loads the adapter over the base model needs the
                same tokenizer, pixel limits and prompts).

The base model is the run's model.path (from the config saved with the checkpoint); --model points at it
when it has moved. Its weights load as stored (a bfloat16 checkpoint in bfloat16: half float32's memory),
each merged in float32 as it is written. A run started from an adapter or another run (model.adapter,
model.from_run) keeps that LoRA's shape in its checkpoint folder (start_lora/), so it exports after that
folder moved. A missing or
corrupted step is an error naming it and listing the steps that exist. Each folder is written whole
into a hidden sibling (.merged.partial) that then takes its place: an export that fails part-way leaves
the former one as it was. When OUT/adapter fails after OUT/merged was written, the two hold different
steps, and that is said before the error.

Serving: each folder's fxjax_export.json says what it is an export of (run, step, stage, base, the answer
length the run evaluated with); merged/generation_config.json decodes greedily up to that length; the chat
template's default system prompt is the one training used (a client that sends the image and the user
prompt alone gets what the model trained with). The answer's markers and box tokens are special tokens:
decode with skip_special_tokens=False. What to know is printed after the export."""

EPILOG = """\
examples:
  fxjax export --run runs/sft --out export/sft            # the newest step
  fxjax export --run runs/grpo --step 300 --out export/grpo-300 --dtype bfloat16
  fxjax export --run runs/grpo --step beta --out export/after-beta   # the model at the end of stage beta
  fxjax export --run runs/grpo --out export/adapter --adapter-only --base-name Qwen/Qwen2.5-VL-3B-Instruct
  fxjax export --run runs/grpo-72b --out export/grpo-72b --mesh fsdp=8   # the model split over 8 devices"""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="the run's train.output_dir (holding checkpoints/) or its checkpoint.dir")
    p.add_argument("--step", type=step_or_stage, metavar="N|STAGE",
                   help="checkpoint step, or a GRPO stage's name (alpha, beta, gamma): the checkpoint at that "
                        "stage's end (default: the newest)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (merged/ and adapter/ inside)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--adapter-only", action="store_true", help="write only OUT/adapter")
    only.add_argument("--merged-only", action="store_true", help="write only OUT/merged")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights, the merged model's and the adapter's (default: the merged "
                        "model in the base checkpoint's dtype, float32 for a checkpoint of mixed dtypes; the adapter "
                        "in float32)")
    p.add_argument("--model", metavar="PATH", help="the run's base model directory, when it moved since training")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="the tokenizer OUT/merged gets, when the run's (data.tokenizer, else the base model's) "
                        "moved since training (checked before the weights load)")
    p.add_argument("--mesh", metavar="AXES",
                   help="where the base model and LoRA load, e.g. fsdp=8 to split a model that does not fit "
                        "one device (default: the run's fsdp and tensor axes when they fit the devices here, the other "
                        "devices on the data axis)")
    p.add_argument("--base-name", metavar="ID",
                   help="the adapter's base_model_name_or_path, e.g. the Hub id Qwen/Qwen2.5-VL-3B-Instruct, for "
                        "loading it where the base model's folder here is not (default: that folder's absolute path)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT/merged, OUT/adapter if they exist (each is written whole into a sibling "
                        "folder, which then takes its place)")
    p.set_defaults(func=run)


def export_run(run_dir: str | Path, out: str | Path, *, step: int | str | None = None, merged: bool = True,
               adapter: bool = True, dtype: str | None = None, model_path: str | None = None,
               tokenizer: str | None = None, mesh=None, base_name: str | None = None, log=None) -> dict[str, Any]:
    """Write OUT/merged and/or OUT/adapter of `run_dir` at `step`; returns {"step": N (an integer), "stage": its
    stage name (a GRPO run's stage end), "merged": dir, "adapter": dir} (`fxjax export`'s JSON line).
    tokenizer: the one OUT/merged gets (default: the run's). mesh: where the run loads
    (train.run_loading.load_run's default, `run_mesh`: the run's fsdp and tensor axes, the other devices on
    the data axis)."""
    from fxjax.run_files import checkpoint_dir_of
    from fxjax.train.run_loading import check_run_paths, load_run, run_config

    cfg = run_config(run_dir, step, model_path)
    check_run_paths(cfg, checkpoint_dir_of(run_dir).absolute())  # (its base model named, not its tokenizer)
    if merged:  # found before the weights load, not after
        tokenizer = tokenizer_to_export(cfg, tokenizer)

    # The base weights as stored, whatever the run computed in (bfloat16 for a bfloat16 checkpoint: half
    # the memory of float32, and the same values): the merge W + scaling * B A upcasts each tensor to
    # float32 as it is written (model.lora.merge_lora), then casts the result to the checkpoint's dtype.
    # attention "auto": the run's kernel may not run here or in float32 (cudnn, splash); export runs no
    # forward pass, and auto picks one that runs on this platform and dtype
    loaded = load_run(run_dir, step, model_path=model_path, dtype="float32", param_dtype="exact", mesh=mesh,
                      attention="auto", log=log)
    return export_loaded(loaded, out, merged=merged, adapter=adapter, dtype=dtype, tokenizer=tokenizer,
                         base_name=base_name, log=log)


def tokenizer_to_export(cfg, given: str | None = None) -> str:
    """`given`, else the run's tokenizer (data.tokenizer, else its base model's), where it holds tokenizer.json."""
    from fxjax.data.tokenizer import tokenizer_json

    tokenizer = given or cfg.tokenizer
    if given and Path(given).is_file():  # (eval and detect take the file: the export copies its folder with it)
        if Path(given).name != "tokenizer.json":
            raise ValueError(f"--tokenizer: {given} is a file; the export copies the tokenizer's folder (its "
                             f"tokenizer.json and configs): give that folder")
        tokenizer = str(Path(given).parent)
    if not Path(tokenizer).is_dir() or tokenizer_json(tokenizer) is None:
        hint = "" if given else "; the run's tokenizer (data.tokenizer, else model.path) moved? pass --tokenizer DIR"
        raise FileNotFoundError(f"the tokenizer to export: no tokenizer.json in {tokenizer}{hint}")
    return tokenizer


def export_loaded(loaded, out: str | Path, *, merged: bool = True, adapter: bool = True,
                  dtype: str | None = None, tokenizer: str | None = None, base_name: str | None = None,
                  log=None) -> dict[str, Any]:
    """`export_run` of a run already loaded (fxjax.train.run_loading.LoadedRun; base weights unrounded from
    the checkpoint's, as `export_run` loads them). `log`: where a failure that leaves OUT/merged and
    OUT/adapter of different steps is said (`fxjax.train.export.write_exports`). base_name: the adapter's
    base_model_name_or_path (a Hub id; default: the base model's path here)."""
    from fxjax.run_files import recorded_stage_ends
    from fxjax.train.export import export_origin, save_adapter, save_merged, write_exports

    cfg, out = loaded.config, Path(out)
    ends = recorded_stage_ends(loaded.checkpoint_dir, loaded.step) if loaded.kind == "grpo" else None
    origin = export_origin(cfg, loaded.kind, loaded.step, loaded.checkpoint_dir, ends, dtype)
    parts = []
    if merged:
        parts.append(("merged", out / "merged", lambda: save_merged(
            loaded.model, out / "merged", dtype=dtype, tokenizer_dir=tokenizer or cfg.tokenizer, data=cfg.data,
            max_new_tokens=cfg.eval.max_new_tokens, origin=origin)))
    if adapter:
        parts.append(("adapter", out / "adapter",
                      lambda: save_adapter(loaded.model, out / "adapter", data=cfg.data, dtype=dtype,
                                           tokenizer_dir=tokenizer or cfg.tokenizer, origin=origin,
                                           base_name=base_name)))
    written = write_exports(parts, loaded.step, log or (lambda text: None))
    return {"step": int(loaded.step), **({"stage": origin["stage"]} if origin["stage"] else {}), **written}


def run(args: argparse.Namespace) -> int:
    say = lambda text: print(f"fxjax export: {text}", file=sys.stderr, flush=True)  # noqa: E731
    if not args.out.strip():  # (Path("") is the working folder: merged/ and adapter/ would land there)
        raise ValueError("--out: give a folder (an empty text names none)")
    if args.base_name is not None and (args.merged_only or not args.base_name.strip()):
        raise ValueError("--base-name: " + ("it names the adapter's base, and --merged-only writes no adapter"
                                            if args.merged_only else "give a Hub id or a path"))
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after the model has loaded
        raise NotADirectoryError(f"--out: {out} is a file, not a directory")
    parts = [name for name, skip in (("merged", args.adapter_only), ("adapter", args.merged_only)) if not skip]
    if args.adapter_only and args.tokenizer:  # an adapter carries no tokenizer: the flag would do nothing
        raise ValueError("--tokenizer: the tokenizer goes into OUT/merged, which --adapter-only does not write")
    from fxjax.train.export import foreign_files

    for name in parts:
        target = out / name
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"--out: {target} is a file; the export writes a folder there (move the file "
                                     f"or give another --out)")
        if target.exists() and any(target.iterdir()) and not args.overwrite:
            raise FileExistsError(f"{target} is not empty; pass --overwrite or another --out")
        held = foreign_files(target)
        if held:  # --overwrite replaces a former export, never a folder of the user's own files
            raise FileExistsError(f"--out: {target} holds files that are not an fxjax export ({held}); --overwrite "
                                  f"replaces only a former export: move them or give another --out")
        require_writable(target, "--out")
    from fxjax.commands.model_args import mesh_from_flag
    from fxjax.run_files import is_adapter_not_model

    if args.model is not None:
        model = Path(args.model)
        if not model.is_dir():  # (as eval and detect say it)
            raise FileNotFoundError(f"--model: {args.model} " + ("is a file; give an HF model directory"
                                                                 if model.exists() else "does not exist"))
        if is_adapter_not_model(model):
            raise ValueError(f"--model: {model} is a PEFT adapter, not a model; --model is the run's base model "
                             f"(an HF directory with config.json), when it moved since training")
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"--model: {model} holds no config.json; give the run's base model (an HF "
                                    f"directory) when it moved since training")
    mesh = mesh_from_flag(args.mesh)  # checked before anything loads
    written = export_run(args.run, out, step=args.step, merged="merged" in parts, adapter="adapter" in parts,
                         dtype=args.dtype, model_path=args.model, tokenizer=args.tokenizer, mesh=mesh,
                         base_name=args.base_name, log=say)
    print(json.dumps(written))
    for line in serving_notes(written):
        say(line)
    return 0


def serving_notes(written: dict[str, Any]) -> list[str]:
    """What to know to serve what was written (said after the JSON line, on stderr): where each folder is
    and how it loads, the prompts, the decoding that keeps the answer's markers, and vLLM's limit."""
    from fxjax.export_record import EXPORT_RECORD_FILE
    from fxjax.train.export import PROMPT_SETTINGS_FILE, template_defaults_to

    stage = f" (stage {written['stage']})" if written.get("stage") else ""
    lines = [f"step {written['step']}{stage} written; each folder's {EXPORT_RECORD_FILE} says which run and step"]
    if "merged" in written:
        lines.append(f"{written['merged']}: transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained loads "
                     "it alone; the folder to give vLLM")
    if "adapter" in written:
        line = (f"{written['adapter']}: peft.PeftModel.from_pretrained(base, this folder), with this folder's "
                "tokenizer (it has the format markers) and preprocessor_config.json")
        targets = json.loads((Path(written["adapter"]) / "adapter_config.json").read_text())["target_modules"]
        named = " ".join([targets] if isinstance(targets, str) else targets)
        if "visual" in named or "all-linear" in named:
            line += ("; vLLM applies LoRA to the language model only and would drop this adapter's vision-encoder "
                     "and merger parts: serve merged/ there")
        lines.append(line)
    folder = Path(written.get("merged") or written["adapter"])
    other = folder.parent / ("merged" if "merged" not in written else "adapter")
    if ("merged" in written) != ("adapter" in written) and (other / EXPORT_RECORD_FILE).is_file():
        from fxjax.export_record import read_export_record

        before, now = read_export_record(other), read_export_record(folder)
        if (before.get("checkpoints"), before.get("step")) != (now.get("checkpoints"), now.get("step")):
            lines.append(f"note: {other} is left as it was: step {before.get('step')} of {before.get('checkpoints')} "
                         f"(its {EXPORT_RECORD_FILE}), so the two folders of {folder.parent} now hold different "
                         f"checkpoints")
    serve = json.loads((folder / PROMPT_SETTINGS_FILE).read_text(encoding="utf-8"))["serve"]
    prompts = ("its note: training used the records' own prompts" if "note" in serve else
               "the chat template's default system prompt is training's"
               if template_defaults_to(folder, serve["system"]) else
               "send the system prompt: the chat template's default is not training's")
    lines.append(f"prompts: the system and user text under \"serve\" in {PROMPT_SETTINGS_FILE} ({prompts}); "
                 "decode with skip_special_tokens=False (vLLM: "
                 "SamplingParams(skip_special_tokens=False)): the answer's markers and box tokens are special "
                 "tokens; the README's \"fxjax export\" section shows serving")
    return lines
