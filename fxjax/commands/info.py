"""`fxjax info [MODEL]`: what a checkpoint directory, preset, training run, PEFT adapter or export folder is,
without loading a weight; with no argument, the presets and the run configs fxjax ships."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fxjax.run_files import is_export_folder


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint directory, preset, training run or PEFT adapter",
                       description="Print the architecture and parameter counts of an HF checkpoint directory "
                                   "or a preset, without loading weights (works for 72B on a laptop); of a fxjax "
                                   "sft/grpo run, its checkpoint steps and GRPO stage ends (what --step of "
                                   "eval, detect and export takes), what its model started from, its LoRA and "
                                   "tokenizer, and whether it is training now or how it ended; of a PEFT adapter, its LoRA and base; of an `fxjax export` folder, "
                                   "also the run and step it holds; of an `fxjax eval` folder (its --out, or the "
                                   "folder of one eval of several --step values), the weights and data it "
                                   "evaluated and its metrics, or how many images an unfinished one holds.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="HF checkpoint directory (with config.json), preset name (tiny, 3b, 7b, 32b, 72b), "
                        "preset YAML, a run's train.output_dir / checkpoint.dir, a PEFT adapter directory, an "
                        "export or eval folder; "
                        "none: the presets and the run configs fxjax ships (--config NAME)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fxjax.presets import load_preset, preset_names

    if args.model is None:  # what `init --preset` and `--config NAME` take
        from fxjax.model_init import abstract_parameter_counts
        from fxjax.train_config import shipped_run_configs

        print("model presets (init --preset, model.preset):")
        for name in preset_names():
            print(f"  {name:6s} {abstract_parameter_counts(load_preset(name))['total']:>15,} parameters")
        print("run configs (sft / grpo / data check --config NAME; fxjax info NAME prints one):")
        print("\n".join(f"  {name}" for name in shipped_run_configs()))
        return 0

    source = Path(args.model)
    if source.is_dir() and (source / "adapter_config.json").is_file():  # a PEFT adapter (an export's, or peft's)
        print("\n".join(_describe_adapter(source)))
        return 0
    if source.is_dir() and is_export_folder(source):  # each part it holds (it read "holds no checkpoints")
        parts = [p for p in ("merged", "adapter") if (source / p).is_dir()]
        print(f"fxjax export folder {source}: " + " and ".join(f"{p}/" for p in parts))
        for part in parts:
            print(f"{part}/:")
            sys.stdout.flush()
            run(argparse.Namespace(model=str(source / part)))
        return 0
    if source.is_dir() and _is_eval_folder(source):  # (it read "holds no checkpoints")
        print("\n".join(_describe_eval(source)))
        return 0
    if source.is_dir() and not (source / "config.json").is_file():  # a training run (its steps and start)?
        from fxjax.run_files import RunLoadError, describe_run

        try:
            lines = describe_run(source)
        except RunLoadError as err:  # (what is wrong with it as a run: no checkpoints, a step folder, ...)
            evals = _eval_folders(source)  # (one eval of several --step values: a folder for each)
            if evals:
                print("\n".join(line for folder in evals for line in _describe_eval(folder)))
                return 0
            raise FileNotFoundError(f"{source}: not an HF checkpoint directory (no config.json); as a fxjax "
                                    f"run: {err}") from None
        from fxjax.train.run_lock import training_now

        holder = training_now(source) if os.name == "posix" else None
        ended = None if holder else _how_it_ended(source)
        print("\n".join(lines + ([f"  training now: {holder}"] if holder else []) + ([ended] if ended else [])))
        return 0
    if not source.exists():
        from fxjax.train_config import shipped_run_configs

        shipped = shipped_run_configs().get(args.model)
        if shipped is not None:  # (a run config fxjax lists by name: its keys and values, as --config reads it)
            print(f"run config {args.model}: {shipped}\n")
            print(shipped.read_text(encoding="utf-8"), end="")
            return 0
    if source.is_file() and source.suffix.lower() in (".jsonl", ".csv"):  # (it said: invalid YAML)
        raise ValueError(f"{source} is a dataset file, not a model, preset or run: `fxjax data check {source}` "
                         f"describes its records")
    if not (source.exists() or args.model in preset_names()):  # checked before the slow imports below
        raise FileNotFoundError(f"{args.model} does not exist and is not a preset; give an HF checkpoint "
                                f"directory, a preset YAML or a preset name ({', '.join(preset_names())})")
    from fxjax.hf_checkpoint import CheckpointError, config_as_loaded
    from fxjax.hf_config import load_config
    from fxjax.model_init import abstract_parameter_counts

    untied = False
    if not source.is_dir():
        cfg = load_preset(args.model)
    else:
        try:  # (as from_pretrained builds it: a tied config whose stored head differs loads untied)
            cfg, _, _, untied = config_as_loaded(source)
        except CheckpointError:  # (no weights, or unreadable ones: the config alone says what it would be)
            cfg = load_config(source)[0]
    t, v = cfg.text, cfg.vision
    print(f"text:   {t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads}/"
          f"{t.num_key_value_heads} kv, mlp {t.intermediate_size}, vocab {t.vocab_size}, "
          f"mrope {list(t.mrope_section)}, tied {cfg.tie_word_embeddings}"
          + (" (config.json ties the head, but the stored lm_head.weight differs from the embeddings: loaded "
             "untied, as transformers 5)" if untied else ""))
    print(f"vision: {v.depth} blocks, hidden {v.hidden_size}, heads {v.num_heads}, mlp {v.intermediate_size}, "
          f"window {v.window_size}px, full attention at {list(v.fullatt_block_indexes)}")
    print(f"tokens: image {cfg.image_token_id}, vision start/end {cfg.vision_start_token_id}/"
          f"{cfg.vision_end_token_id}, eos {list(cfg.eos_token_id)}")
    for part, n in abstract_parameter_counts(cfg).items():
        print(f"  {part:13s} {n:>16,d} parameters")
    for line in _export_origin(source) if source.is_dir() else []:  # (an `fxjax export` folder: its run and step)
        print(line)
    return 0


ENDINGS = {"finished": "finished (trained to its end, evaluated and exported)",
           "preempted": "stopped by a signal (its checkpoint saved: the same command resumes it)",
           "non-finite": "stopped by a non-finite loss or gradient (train.on_nonfinite: stop)"}


def _how_it_ended(folder: Path) -> str | None:
    """The run's last end record in its metrics.jsonl, said; None without one, or without a readable file."""
    from fxjax.commands.report_drawing import last_end
    from fxjax.run_files import METRICS_FILE
    from fxjax.train.metrics import read_metrics

    try:
        end = last_end(read_metrics(folder / METRICS_FILE))
    except (OSError, ValueError):  # (no file, or a line that is no record: `fxjax report` names it)
        return None
    if end is None:
        return None
    status = str(end.get("status"))
    return f"  ended: {ENDINGS.get(status, status)}, at step {end['step']}"


def _is_eval_folder(folder: Path) -> bool:
    """Whether `fxjax eval` wrote into `folder` (its settings.json, or predictions.jsonl)."""
    from fxjax.commands.eval_folder import PREDICTIONS, SETTINGS

    return (folder / SETTINGS).is_file() or (folder / PREDICTIONS).is_file()


def _eval_folders(folder: Path) -> list[Path]:
    """`folder` when it is an eval folder, else its subfolders that one eval of several --step values wrote
    (one per step); [] for any other folder."""
    if _is_eval_folder(folder):
        return [folder]
    try:
        return [f for f in sorted(folder.iterdir()) if f.is_dir() and _is_eval_folder(f)]
    except OSError:
        return []


def _describe_eval(folder: Path) -> list[str]:
    """What an eval folder holds: the weights and data it evaluated, its metrics, or how far it got."""
    import json

    from fxjax.commands.eval_folder import METRICS, PREDICTIONS, SETTINGS

    def read(name: str) -> dict:
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    settings, metrics = read(SETTINGS), read(METRICS)
    model = settings.get("model") or {}
    what = (f"run {model['run']} at step {model.get('step')}" if model.get("run") else
            f"model {model.get('model')}" + (f" with adapter {model['adapter']}" if model.get("adapter") else ""))
    data = ", ".join(settings.get("data") or ()) or "(not recorded)"
    lines = [f"fxjax eval folder {folder}: {what}, on {data}"]
    try:
        with open(folder / PREDICTIONS, "rb") as f:
            rows = sum(1 for line in f if line.strip())
    except OSError:
        rows = 0
    if not metrics:
        lines.append(f"  unfinished: {rows} image(s) in {PREDICTIONS}, no {METRICS} yet; the same eval command "
                     f"goes on from them")
        return lines

    def number(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    lines.append(f"  {metrics.get('examples')} image(s): accuracy {number('accuracy')}, F1 (generated) "
                 f"{number('f1')}, format rate {number('format_rate')}, mean IoU {number('mean_iou')} (on "
                 f"{metrics.get('iou_images', 0)} generated image(s)), truncated {number('truncated_rate')}")
    if metrics.get("not_evaluated"):
        lines.append(f"  not evaluated: {len(metrics['not_evaluated'])} record(s) ({METRICS}: not_evaluated)")
    return lines


def _describe_adapter(folder: Path) -> list[str]:
    """`fxjax info ADAPTER`: a PEFT adapter's LoRA, its base, and what it is an export of (fxjax_export.json)."""
    import json

    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{folder / 'adapter_config.json'}: not valid JSON ({err})") from None
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    vision = sum("visual" in str(n) for n in names)
    where = (f"{len(names)} modules ({vision} in the vision encoder and merger)" if len(names) > 1
             else f"target_modules {targets!r}")
    lines = [f"PEFT adapter: r {config.get('r')}, lora_alpha {config.get('lora_alpha')}"
             f"{', rsLoRA' if config.get('use_rslora') else ''}, {where}",
             f"base: {config.get('base_model_name_or_path')}"]
    return lines + _export_origin(folder)


def _export_origin(folder: Path) -> list[str]:
    """What an export folder is an export of, from its fxjax_export.json ([] without one)."""
    from fxjax.export_record import read_export_record

    origin = read_export_record(folder)
    if not origin:
        return []
    stage = f", stage {origin['stage']}" if origin.get("stage") else ""
    return [f"export of step {origin.get('step')}{stage} of the {origin.get('kind')} run in "
            f"{origin.get('checkpoints')} (fxjax {origin.get('fxjax')}, {origin.get('exported_at')})"]
