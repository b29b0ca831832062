"""Export after training: the PEFT adapter, and the merged model as a self-contained HF checkpoint.

Thin wrappers over fxjax's own writers, which work with one process or several (every process joins the
gathers; process 0 writes): `fxjax.peft_io.save_peft_adapter` writes the LoRA factors as a PEFT adapter
directory, and `fxjax.save_pretrained` merges every enabled adapter into its kernel (W + scaling * A @ B,
in float32, stored in the checkpoint's dtype) while writing, leaving the model itself unchanged.

The merged directory also gets what serving it needs: the tokenizer training used (chat template and the
output-format markers included; the adapter's directory gets it too) and the image processor's
preprocessor_config.json with the pixel limits training used, so `AutoTokenizer` / `AutoImageProcessor` (and `AutoProcessor`, which needs torchvision for
Qwen2.5-VL's video processor) load it with nothing else at hand, and fxjax_prompt_settings.json, the
prompts to serve it with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fxjax.export_record import EXPORT_RECORD_FILE, json_file, read_export_record
from fxjax.file_modes import require_writable

__all__ = ["PROMPT_SETTINGS_FILE", "PROMPT_SETTING_KEYS", "check_export_targets",
           "export_origin", "read_prompt_settings", "run_lineage", "save_adapter", "save_merged",
           "serving_texts", "set_template_system_prompt", "template_defaults_to", "write_export_record", "write_exports",
           "write_greedy_generation_config", "write_preprocessor_config", "write_prompt_settings", "written_whole"]

# Written into an exported adapter / merged directory: how training built its prompts, so that `fxjax eval`
# and `fxjax detect` with --adapter / --model build them the same way (as they do with --run).
PROMPT_SETTINGS_FILE = "fxjax_prompt_settings.json"
PROMPT_SETTING_KEYS = ("min_pixels", "max_pixels", "prompts", "system_prompt", "user_prompt", "max_length", "seed",
                       "long_images")


def save_adapter(model, out_dir: str | Path, *, data=None, dtype: str | None = None,
                 tokenizer_dir: str | Path | None = None, origin: Mapping[str, Any] | None = None,
                 base_name: str | None = None) -> Path:
    """PEFT adapter directory (adapter_config.json + adapter_model.safetensors) of the model's LoRA, with the
    run's prompt settings (`write_prompt_settings`) and a preprocessor_config.json of its pixel limits when
    `data` (its DataSection) is given: a PEFT user's `AutoImageProcessor.from_pretrained(adapter)` resizes as
    training did (the base model's file holds Qwen's limits, or none for a model of `fxjax init`).

    tokenizer_dir: the tokenizer training read (as `save_merged`'s; default: the model's own directory's,
    when it holds one), written with the six format markers: a Hub base model's tokenizer lacks them, so
    an adapter served with the base's tokenizer decoded `<think>...<verdict>generated</verdict>` as plain
    "...generated", which no parser reads. With `data`, the chat template's default system prompt is the
    one training used (`set_template_system_prompt`).

    origin: what the export is of (run, step, stage, ...), written as EXPORT_RECORD_FILE. base_name: the
    adapter_config.json's base_model_name_or_path (a Hub id to load the base from elsewhere; default: the
    base model's absolute path here)."""
    import jax

    from fxjax.data.tokenizer import export_tokenizer
    from fxjax.peft_io import save_peft_adapter

    tokenizer_dir = _tokenizer_to_export(model, tokenizer_dir)

    def write(folder: Path) -> None:
        save_peft_adapter(model, folder, dtype=dtype)
        if data is not None:
            write_prompt_settings(folder, data)
        if jax.process_index() != 0:  # (process 0 writes the folder)
            return
        if base_name is not None:
            _set_base_name(folder, base_name)
        if data is not None:
            write_preprocessor_config(folder, data.min_pixels, data.max_pixels, vision=model.config.vision)
        if tokenizer_dir is not None:
            export_tokenizer(tokenizer_dir, folder)
            _template_defaults_to_training(folder, data)
        if origin is not None:
            write_export_record(folder, origin)

    return written_whole(Path(out_dir), write)


def _set_base_name(folder: Path, base_name: str) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _tokenizer_to_export(model, tokenizer_dir: str | Path | None) -> str | Path | None:
    """`tokenizer_dir`, checked before any weight is written; None: the model's own directory's tokenizer,
    when it has one."""
    from fxjax.data.tokenizer import tokenizer_json

    source = getattr(model, "hf_source", None)
    if tokenizer_dir is None:
        if source is not None and tokenizer_json(source.directory) is not None:
            return source.directory
        return None
    if not Path(tokenizer_dir).is_dir() or tokenizer_json(tokenizer_dir) is None:  # before the weights, not after
        raise FileNotFoundError(f"the tokenizer to export: no tokenizer.json in {tokenizer_dir}")
    return tokenizer_dir


def save_merged(model, out_dir: str | Path, *, dtype: str | None = None, tokenizer_dir: str | Path | None = None,
                image_pixels: tuple[int, int] | None = None, data=None, max_new_tokens: int | None = None,
                origin: Mapping[str, Any] | None = None) -> Path:
    """An HF checkpoint directory of base + LoRA merged (loads in transformers without peft), with the
    tokenizer and image-processor files.

    tokenizer_dir: the model or tokenizer directory training read its tokenizer from (the run's
        `cfg.tokenizer`); default: the directory the model was loaded from, when it holds tokenizer.json.
    image_pixels: (min_pixels, max_pixels) training resized images to (`cfg.data.min_pixels`,
        `cfg.data.max_pixels`); written to preprocessor_config.json. Default: keep the base model's file,
        or write the data pipeline's defaults when it had none.
    data: the run's DataSection: its pixel limits (for image_pixels) and prompt settings (`write_prompt_settings`),
        and its system prompt the chat template's default (`set_template_system_prompt`).
    max_new_tokens: the longest answer, for generation_config.json (the run's eval.max_new_tokens: without
        one, transformers' `generate` stops after 20 tokens).
    origin: what the export is of (run, step, stage, ...), written as EXPORT_RECORD_FILE.
    """
    import jax

    from fxjax.data.tokenizer import export_tokenizer
    from fxjax.hf_save import write_checkpoint

    out, source = Path(out_dir), getattr(model, "hf_source", None)
    if source is not None and out.resolve() == Path(source.directory).resolve():
        raise FileExistsError(f"{out} is the directory the model was loaded from: write to another one")
    tokenizer_dir = _tokenizer_to_export(model, tokenizer_dir)
    if data is not None:
        image_pixels = (data.min_pixels, data.max_pixels)

    def write(folder: Path) -> None:
        write_checkpoint(model, folder, dtype=dtype)  # (the run's tokenizer follows: export_tokenizer)
        if jax.process_index() != 0:
            return
        write_greedy_generation_config(folder, max_new_tokens)
        if data is not None:
            write_prompt_settings(folder, data)
        if tokenizer_dir is not None:
            export_tokenizer(tokenizer_dir, folder)
            _template_defaults_to_training(folder, data)
        if origin is not None:
            write_export_record(folder, origin)
        if image_pixels is not None or not (folder / "preprocessor_config.json").is_file():
            write_preprocessor_config(folder, *(image_pixels or _default_pixels()), vision=model.config.vision)

    return written_whole(out, write)


# generation_config.json keys that make HF generate (and vLLM, which applies the model's file by default)
# decode otherwise than greedily: Qwen2.5-VL-Instruct's file has do_sample, temperature 0.1, top_p 0.001,
# top_k 1 and repetition_penalty 1.05, which changed answers from their fourth token on
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                 "repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty")


def write_greedy_generation_config(folder: Path, max_new_tokens: int | None = None) -> None:
    """The merged export's generation_config.json as `fxjax eval` and `fxjax detect` decode: greedily (the
    base model's stop, pad and start tokens kept, its sampling settings dropped), up to `max_new_tokens`
    when given (transformers' default is 20 tokens in all, prompt included); a server that samples passes
    its own."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config = {key: value for key, value in config.items() if key not in SAMPLING_KEYS}
    config["do_sample"] = False
    if max_new_tokens is not None:
        config["max_new_tokens"] = int(max_new_tokens)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def write_exports(parts: list[tuple[str, Path, Callable[[], Path]]], step: int,
                  say: Callable[[str], None]) -> dict[str, str]:
    """Run each export writer of `parts` ((name, folder, write), in order); {name: absolute folder written}.

    Each folder is replaced whole or not at all (`written_whole`), but two of them are two replacements: when
    a later one fails (a full disk) after an earlier one was written, the folders hold different steps, and a
    user who serves the adapter next to the merged model would not know. That is said (which folder has step
    `step`, what the failed one still holds) before the error goes on."""
    written: dict[str, str] = {}
    for name, folder, write in parts:
        try:
            written[name] = str(Path(write()).absolute())  # (a run's result stays right after a chdir)
        except BaseException:
            if written:  # (what the failed folder holds now: `written_whole` leaves it as it was, or empty)
                held = "an earlier export" if (Path(folder) / PROMPT_SETTINGS_FILE).is_file() else "no export"
                done = " and ".join(f"the {done_name} ({path})" for done_name, path in written.items())
                say(f"wrote {done} of step {step}, but writing the {name} failed (below): {folder} still holds "
                    f"{held}, not step {step}, so the folders no longer match")
            raise
    return written


def check_export_targets(export, checkpoint_dir: str | Path | None = None) -> None:
    """Before a run trains: its end-of-run export folders (`export`, the config's ExportSection) can be
    written, and one that exists holds nothing or a former export (PROMPT_SETTINGS_FILE, which every export
    of a run writes) of this run (`checkpoint_dir`: its fxjax_export.json's `checkpoints`). The export
    replaces its folder whole, so a folder of the user's own files would be deleted at the end of the run,
    and another run's export (a config copied with only train.output_dir changed: the SFT adapter a GRPO
    config starts from) replaced without a word."""
    for key in ("adapter_dir", "merged_dir"):
        target = getattr(export, key)
        if not target:
            continue
        folder = Path(target)
        require_writable(folder, f"export.{key}")  # (a file there: NotADirectoryError)
        held = foreign_files(folder)
        if held:
            raise FileExistsError(f"export.{key}: {target} holds files that are not an fxjax export ({held}); the "
                                  "export at the end of the run replaces its folder whole: give an empty or new folder")
        other = read_export_record(folder).get("checkpoints") if folder.is_dir() else None
        if checkpoint_dir is not None and isinstance(other, str) and _another_folder(Path(other), Path(checkpoint_dir)):
            step = read_export_record(folder).get("step")
            raise FileExistsError(f"export.{key}: {target} holds the export of another run (step {step} of {other}, "
                                  f"its {EXPORT_RECORD_FILE}), which the export at the end of this run would replace: "
                                  f"give this run its own export.{key}, or remove that folder first")


def _another_folder(recorded: Path, checkpoint_dir: Path) -> bool:
    """Whether the checkpoint folder an export records is another than `checkpoint_dir`: one that is still
    there and is not the same folder (a path spelt otherwise, through a symbolic link, or as another host of a
    multi-process run mounts it, is the same; one no longer there, a project moved, is let through)."""
    if not recorded.is_dir():
        return False
    try:
        return not (checkpoint_dir.is_dir() and os.path.samefile(recorded, checkpoint_dir))
    except OSError:
        return False


def foreign_files(folder: Path) -> str:
    """What a folder an export would replace holds when it is not a former export (no PROMPT_SETTINGS_FILE,
    which every export writes): its first entries, named; "" for a former export, an empty or no folder."""
    if not folder.is_dir() or (folder / PROMPT_SETTINGS_FILE).is_file():
        return ""
    held = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    return ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")


def written_whole(out: Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)` into a sibling of `out` that then takes its place (every process calls it; process 0
    renames). A failure part-way leaves `out` as it was, a former export whole or none at all, never a
    half-written folder that loads (base tokenizer, stale pixel limits); a former export is replaced, not
    written over (no stale shards of a larger one)."""
    import jax

    from fxjax.device_mesh import barrier

    partial, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.replaced")
    if out.exists() and not out.is_dir():  # a user's file is not a former export to replace
        raise NotADirectoryError(f"{out} is a file, not a folder; the export writes a folder there")
    if jax.process_index() == 0:
        if old.exists() and not (out.exists() or out.is_symlink()):  # killed between the two renames below
            old.rename(out)
        for leftover in (partial, old):  # of an export that failed or was killed
            _remove(leftover)
    barrier("fxjax.export.partial")  # cleared before any process makes it again
    try:
        write(partial)
    except BaseException:
        if jax.process_index() == 0:  # (a full disk: the failed attempt's files would keep it full)
            _remove(partial)
        raise
    if jax.process_index() == 0:
        if out.exists() or out.is_symlink():
            out.rename(old)
        partial.rename(out)
        try:  # the export is in place: the former one's copy left behind is removed by the next export
            _remove(old)
        except OSError:
            pass
    return out


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _default_pixels() -> tuple[int, int]:
    from fxjax.config_sections import DataSection

    return DataSection().min_pixels, DataSection().max_pixels


def write_preprocessor_config(out_dir: str | Path, min_pixels: int, max_pixels: int, vision=None) -> Path:
    """preprocessor_config.json of Qwen2.5-VL's image processor (the Hub's keys) with these pixel limits
    and the patch sizes of `vision` (a model.config.VisionConfig; default: Qwen2.5-VL's); an existing
    file keeps its other keys."""
    from fxjax.image_processing import CLIP_MEAN, CLIP_STD
    from fxjax.model.config import VisionConfig

    vision = vision or VisionConfig()
    path = Path(out_dir) / "preprocessor_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {
        "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    _set_pixels(config, min_pixels, max_pixels)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # transformers 5.x's processor_config.json nests the image processor's settings, which AutoImageProcessor
    # then reads instead of preprocessor_config.json: the base model's copy would restore its limits
    nested = Path(out_dir) / "processor_config.json"
    if nested.is_file():
        processor = json.loads(nested.read_text(encoding="utf-8"))
        if isinstance(processor.get("image_processor"), dict):
            _set_pixels(processor["image_processor"], min_pixels, max_pixels)
            nested.write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return path


def _set_pixels(config: dict, min_pixels: int, max_pixels: int) -> None:
    config.update(min_pixels=int(min_pixels), max_pixels=int(max_pixels))
    if isinstance(config.get("size"), dict):  # transformers 5.x writes the limits here too
        config["size"].update(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))


def write_prompt_settings(out_dir: str | Path, data) -> Path | None:
    """PROMPT_SETTINGS_FILE in `out_dir`: the prompt and image settings of `data` (a DataSection) training
    used; process 0 writes it."""
    import jax

    if jax.process_index() != 0:
        return None
    path = Path(out_dir) / PROMPT_SETTINGS_FILE
    settings = {key: getattr(data, key) for key in PROMPT_SETTING_KEYS}
    serve, own = serving_texts(data)
    settings["own_prompt_files"] = own
    path.write_text(json.dumps(dict(settings, serve=serve, about="how training built its prompts; fxjax eval / "
                                    "detect read it (their flags override it); serve: the system and user "
                                    "prompt `fxjax detect` sends with an image"), indent=2) + "\n",
                    encoding="utf-8")
    return path


def serving_texts(data) -> tuple[dict[str, str], list[str]]:
    """({"system", "user"[, "note"]}, the ms-swift train files with prompts of their own) of `data` (a
    DataSection): the two texts to serve with, resolved (a null setting means fxjax's built-in prompt, or
    the nine templates), what `fxjax detect` sends, so that a transformers server needs neither fxjax nor
    its defaults; "note" when training used other prompts (ms-swift records' own)."""
    from fxjax.data.formats import file_starts_with_swift_record
    from fxjax.data.prompts import serving_prompt

    serve = serving_prompt(data.system_prompt, data.user_prompt)
    # ms-swift train files keep their own system and user text (data.prompts other than 'templates'): named
    # here, since `fxjax detect --model` runs where the train files may not be
    own = [] if data.prompts == "templates" else [str(f) for f in data.train_files
                                                  if file_starts_with_swift_record(f)]
    unread = [str(f) for f in data.train_files if not Path(f).is_file()]
    if own:
        serve["note"] = (f"trained on ms-swift records with their own prompts ({', '.join(own)}; data.prompts "
                         f"{data.prompts!r}): serve with those records' system and user texts, not these")
    elif unread and data.prompts != "templates":
        serve["note"] = (f"the train files {', '.join(unread)} were not there to read at export: if they were "
                         f"ms-swift records with their own prompts (data.prompts {data.prompts!r}), serve with "
                         "those prompts instead of these")
    return serve, own


def read_prompt_settings(directory: str | Path) -> dict:
    """The settings `write_prompt_settings` left in `directory` ({} when there are none); a malformed file is
    an error naming it."""
    path = Path(directory) / PROMPT_SETTINGS_FILE
    raw = json_file(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of {', '.join(PROMPT_SETTING_KEYS)}")
    settings = {key: raw[key] for key in PROMPT_SETTING_KEYS if key in raw}
    own = raw.get("own_prompt_files", [])  # (absent in exports older than the key: nothing known)
    if not isinstance(own, list) or not all(isinstance(f, str) for f in own):
        raise ValueError(f"{path}: own_prompt_files must be a list of file names, got {own!r}")
    if own:
        settings["own_prompt_files"] = own
    return settings


# The chat template's default system prompt (what a conversation without a system message gets): Qwen's
# text, or one an earlier export of fxjax put in its place (a run started from an exported model).
_DEFAULT_SYSTEM = re.compile(r'<\|im_start\|>system\n(?:You are a helpful assistant\.|\{\{ "(?:[^"\\]|\\.)*" \}\})'
                             r'<\|im_end\|>')


def set_template_system_prompt(template: str, system: str) -> str | None:
    """`template` (a Qwen chat template, Jinja) with `system` as the system prompt of a conversation that
    sends none (Qwen's is "You are a helpful assistant."): a client that sends the image and the user
    prompt alone (an OpenAI-style request to vLLM) then gets the prompt the model trained with, not a text
    it never saw. `system` goes in as a Jinja string expression, so braces, quotes and newlines in it stay
    text. None when the template has no such default (another model family's: left as it is)."""
    if not _DEFAULT_SYSTEM.search(template):
        return None
    literal = _jinja_string(system)
    return _DEFAULT_SYSTEM.sub(lambda _: f"<|im_start|>system\n{literal}<|im_end|>", template)


def _jinja_string(text: str) -> str:
    """`text` as a Jinja expression that renders it as written (a JSON string is a Jinja string literal)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _template_defaults_to_training(folder: Path, data) -> None:
    """The exported tokenizer's chat templates (tokenizer_config.json's, chat_template.jinja and
    chat_template.json, for the tokenizer and the processor) default to the system prompt training used
    (`set_template_system_prompt`); without `data` left as they are. Training on ms-swift records' own
    prompts: Qwen's default (what those without a system text trained with; a tokenizer from an earlier
    fxjax export would otherwise keep that run's)."""
    if data is None:
        return
    from fxjax.data.prompts import QWEN_DEFAULT_SYSTEM

    serve, _ = serving_texts(data)
    system = QWEN_DEFAULT_SYSTEM if "note" in serve else serve["system"]
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, str):
            config["chat_template"] = set_template_system_prompt(template, system) or template
        elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            for entry in template:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    entry["template"] = set_template_system_prompt(entry["template"], system) or entry["template"]
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        changed = set_template_system_prompt(jinja.read_text(encoding="utf-8"), system)
        if changed is not None:
            jinja.write_text(changed, encoding="utf-8")
    processor = folder / "chat_template.json"
    if processor.is_file():
        config = json.loads(processor.read_text(encoding="utf-8"))
        if isinstance(config.get("chat_template"), str):
            changed = set_template_system_prompt(config["chat_template"], system)
            if changed is not None:
                config["chat_template"] = changed
                processor.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def template_defaults_to(folder: Path, system: str) -> bool:
    """Whether the exported chat template (chat_template.jinja, else tokenizer_config.json's) gives a
    conversation without a system message `system` (`set_template_system_prompt` put it there)."""
    jinja = folder / "chat_template.jinja"
    config = json_file(folder / "tokenizer_config.json") or {}
    text = jinja.read_text(encoding="utf-8") if jinja.is_file() else str(config.get("chat_template") or "")
    return _jinja_string(system) in text


def export_origin(cfg, kind: str, step: int, checkpoint_dir: str | Path,
                  stage_ends: Sequence[tuple[str, int]] | None = None, dtype: str | None = None) -> dict[str, Any]:
    """What an export of a run's `step` is of, for its record (`write_export_record`): the run's checkpoints,
    its kind, the step and its GRPO stage (of `stage_ends`: the stage the step belongs to; `stage_end`: the
    step ends it), the base model (for a run started from another run, that run's), the weights' dtype
    (null: the merged model in the base's, the adapter in float32) and the answer length the run evaluated
    with (what `fxjax detect --model` decodes to)."""
    from fxjax.train_config import base_model_section

    base = base_model_section(cfg)
    stage = next(((name, end) for name, end in stage_ends or () if step <= end), None)
    return {"checkpoints": str(Path(checkpoint_dir).absolute()), "kind": kind, "step": step,
            "stage": stage[0] if stage else None, "stage_end": stage is not None and step == stage[1],
            "base_model": None if base is None else str(Path(base.path).absolute()) if base.path else base.preset,
            "dtype": dtype, "max_new_tokens": cfg.eval.max_new_tokens,
            "continues": run_lineage(checkpoint_dir)}


def run_lineage(checkpoint_dir: str | Path) -> list[str]:
    """The fingerprints (fxjax.merged_lora.merge_record) of the LoRA a run started from (model.adapter,
    model.from_run) and of those that one continued in turn, from the run's kept start
    (run_setup.keep_start_lora); [] for a run of fresh LoRA. An export records them (`continues`): its
    adapter applied to a merged export of one of them would add that LoRA's update twice."""
    from fxjax.run_files import START_FILE, START_LORA_DIR

    start = json_file(Path(checkpoint_dir) / START_LORA_DIR / START_FILE)
    if not isinstance(start, dict):
        return []
    return list(dict.fromkeys([*start.get("lora_fingerprints", []), *start.get("continues", [])]))


def write_export_record(folder: Path, origin: Mapping[str, Any]) -> Path:
    """EXPORT_RECORD_FILE: what the folder is an export of (`origin`: the run, its step and stage, ...), with
    fxjax's version and the time, so that an export found later, or a merged / adapter pair side by side,
    says which checkpoint it holds."""
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    try:
        fxjax_version = version("fxjax")
    except PackageNotFoundError:
        fxjax_version = None
    record = {**origin, "fxjax": fxjax_version,
              "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = folder / EXPORT_RECORD_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
