"""`fxjax demo`: the whole method on a tiny model, offline, in minutes on a laptop CPU.

    make-demo-data -> a tiny random Qwen2.5-VL saved in HF layout (so it loads through the same code as a
    real checkpoint) with the real Qwen2.5-VL tokenizer (built from the dashscope BPE ranks)
    -> LoRA SFT (fxjax.train.sft.run_sft) -> GRPO through the stages alpha, beta, gamma starting from the
    SFT adapter (fxjax.train.grpo.run_grpo) -> `fxjax eval` on the held-out images before SFT, after SFT
    and after each GRPO stage -> `fxjax export` of the GRPO run (merged HF checkpoint + PEFT adapter)
    -> `fxjax report` PNGs of both runs and of the five held-out evaluations side by side -> `fxjax detect`
    on a few held-out images before SFT, after SFT and after GRPO, drawn side by side in one PNG -> one table.

Like the CLI, this module sits on top of everything (it drives fxjax.train and fxjax.commands); fxjax's
core never imports it.

The tiny model is the `tiny` preset (hidden 64, 2 decoder layers, 2 vision blocks, the full 151936-token
vocabulary) with one change to its random init (fxjax.demo_model): the (tied) embedding rows of the tokens
the training texts use are drawn with std 0.3 instead of 0.02, so that the model can be confident about
them, while the other 151k rows stay small, so that where it is unsure its probability stays on those tokens.

What the demo data make easy, and why (a property of the demo data, not of the method): a random 10M-
parameter model has no vision to speak of and no positional read-out, so the data carry traces it can
pick up within minutes:
* the generated pixels carry an up-sampling fingerprint (`add_fingerprint`: a period-2 checkerboard, the
  trace transposed convolutions leave; Frank et al. 2020 detect generators by it): a third of it over the
  whole frame and all of it inside the artefact region (fingerprint_scope "frame+regions"), so the verdict
  is learnable from any part of the image and the region is where the trace is strongest. Without it the
  verdict stays at chance (the local artefacts are not separable from a random patch embedding: a linear
  discriminant on the moments of the patch embeddings gets 47% held out);
* one region per generated image, a full-width band one 28-pixel row high, on 56 x 56 images (2 x 2 image
  tokens; a multiple of 28, so the image processor keeps the pixels: resampling would blur the period-2
  pattern): locating the region is choosing the top or the bottom row of image tokens;
* inside the region, a row code (`add_row_code`, 40 levels: stripes whose width says which row of image
  tokens they are in). It stands in for the positional knowledge a pretrained Qwen2.5-VL has and a randomly
  initialised one lacks: the values its attention mixes carry no position, and the tiny preset's mrope
  turns its h/w sections by ~1e-3 rad per row;
* one artefact kind (posterised banding: the caption is fixed), one-clause reasoning texts (`brief`) and a
  one-line system prompt: few tokens per step (the 152k-way lm_head is most of a step's cost), and the
  image tokens a larger share of what the answer attends over.

What was measured while tuning these settings, and what GRPO does and does not do with them:
docs/demo_tuning.md (the README's demo section sums it up). The demo's GRPO uses SFT's data with generated
and real prompts alternating and the generated ones alternating between the two bands (`_balanced_prompts`),
so a step's mean reward follows the policy rather than the mix it happened to draw, and no step pushes the row
one way for every image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fxjax.config_mapping import check_seed
from fxjax.demo_summary import STAGES, held_out_stage_rewards, phase_table, stage_trends

__all__ = ["DEMO", "QUICK", "run_demo"]

# The demo's run: 3.5-8 minutes on 2 idle CPU cores (CI 2026-12-05, a9aa77e: 4.1 min; SFT 93 s, GRPO 106 s;
# the same VM is up to a third slower on some days).
# SFT: 200 steps at lr 1e-3 learn the format and the verdict and the row in part (seed 0: 100% / 100% / IoU
# 0.79 held out; with every embedding row at std 0.3, as before 2026-12-04: 0.76, 120 steps 0.79 with the two
# row digits barely apart, 300 steps 1.00).
# GRPO: lr 1e-4 decaying along a cosine, temperature 1.0, top-k 5, prompts balanced by label and band
# (`_balanced_prompts`). With temperature 0.9 and the labels alone balanced, seeds 2 and 3 ended with one row
# for every image; balancing the bands too stopped that, and temperature 1.0 (more groups whose four samples
# differ) let seed 2 leave its one-row start (docs/demo_tuning.md has every run). Top-k 5: before the base
# model kept its unused tokens' embedding small (fxjax.demo_model), the tiny model's answer at an uncertain
# position spread most of its mass over the 152k-token tail; with top-k 50, 16-31% of the samples broke the
# box, and top-p 0.8 keeps thousands of tail tokens.
# One line instead of fxjax.data.prompts.SYSTEM_PROMPT (110 tokens), and one user prompt instead of its nine
# templates: see the module docstring for what each changed.
DEMO_SYSTEM_PROMPT = "Find AI-generated images and box their artefacts."
DEMO_USER_PROMPT = "Box the artefacts and give your verdict."
# SFT's and GRPO's data settings (the longest demo example is 114 tokens).
_DATA = {"min_pixels": 3136, "max_pixels": 12544, "max_length": 128, "length_buckets": [128], "batch_size": 8,
         "system_prompt": DEMO_SYSTEM_PROMPT, "user_prompt": DEMO_USER_PROMPT}
DEMO: dict[str, Any] = dict(
    images=960,  # 800 train, 160 held out
    test_fraction=1 / 6,
    sides=(56, 56),  # a multiple of 28: the image processor keeps the pixels (2 x 2 image tokens)
    max_regions=1,
    fingerprint=36.0,  # see fxjax.data.demo_data.add_fingerprint and the module docstring
    fingerprint_scope="frame+regions",
    box_multiple=28,
    region_layout="bands",
    row_code=40.0,  # see fxjax.data.demo_data.add_row_code and the module docstring
    row_code_scope="regions",
    artefacts=("banding",),
    brief=True,
    system_prompt=DEMO_SYSTEM_PROMPT,
    user_prompt=DEMO_USER_PROMPT,
    embedding_std=0.3,  # the task tokens' rows (fxjax.demo_model)
    eval=dict(examples=60, batch_size=20, max_new_tokens=80),  # the longest demo answer is 56 tokens
    overlay_images=dict(generated=3, real=1),
    sft=dict(steps=200, config={
        "model": {"dtype": "float32", "remat": "none"},
        "lora": {"rank": 32, "alpha": 64, "dropout": 0.0},
        "data": _DATA,
        "optim": {"learning_rate": 1.0e-3, "warmup_steps": 10, "max_grad_norm": 1.0, "schedule": "cosine"},
        "train": {"loss_chunk": 48, "log_every": 10, "progress_bar": True},  # see configs/sft.yaml
        "checkpoint": {"every": 100, "keep": 1},
        "eval": {"at_start": False, "at_end": False},  # the demo evaluates with `fxjax eval` instead
    }),
    grpo=dict(stage_steps=10, config={
        "model": {"dtype": "float32", "remat": "none"},
        "lora": {"dropout": 0.0},
        "data": _DATA,
        "optim": {"learning_rate": 1.0e-4, "warmup_steps": 2, "max_grad_norm": 1.0, "schedule": "cosine"},
        "train": {"loss_chunk": 64, "log_every": 1, "progress_bar": True},
        "checkpoint": {"keep": 3, "async_save": False},
        "eval": {"at_start": False, "at_end": False},
        "grpo": {"num_generations": 4, "max_completion_length": 64, "temperature": 1.0, "top_k": 5, "beta": 0.0,
                 "log_completions": True},  # what GRPO sampled: grpo/completions.jsonl
    }),
)
# --quick: a smoke run of every phase (nothing is learned).
QUICK: dict[str, Any] = dict(images=48, sft_steps=4, stage_steps=1, eval=dict(examples=8, batch_size=8,
                                                                               max_new_tokens=32),
                             max_completion_length=24, overlay_images=dict(generated=1, real=1))
_MARKER = ".fxjax-demo"


def _say(text: str) -> None:
    print(text, flush=True)


_OWN_DIRS = ("data", "base-model", "sft", "sft-adapter", "grpo", "export", "eval", "report", "detect")


def _prepare_dir(out: Path, overwrite: bool = False) -> None:
    """The demo owns `out`: refuse a non-empty directory it did not create, and an earlier demo's results
    unless `overwrite` (a second seed must not wipe the first one's run without being asked to)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out: {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).exists():
        raise FileExistsError(f"{out} exists and was not made by `fxjax demo`; pass --out to choose another directory")
    earlier = [sub for sub in _OWN_DIRS if (out / sub).exists()]
    listed = ", ".join(d + "/" for d in earlier)
    if earlier and not overwrite:
        raise FileExistsError(f"{out} holds an earlier demo's results ({listed}); pass --overwrite to replace "
                              "them, or --out another directory")
    if earlier:
        _say(f"replacing the earlier demo's results in {out}: {listed}")
    for sub in earlier:
        shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("made by fxjax demo\n")


class _Phases:
    """Wall and CPU time per phase, printed as each ends. The CPU time (all threads of this process) tells
    what a phase costs when the machine is shared: on an idle machine with C cores the wall time lies
    between cpu / C and cpu."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float, float]] = []
        self._t, self._cpu = time.perf_counter(), time.process_time()

    def done(self, name: str, text: str) -> None:
        seconds, cpu = time.perf_counter() - self._t, time.process_time() - self._cpu
        self.times.append((name, seconds, cpu))
        _say(f"[{len(self.times)}] {text} ({seconds:.0f}s, cpu {cpu:.0f}s)")
        self._t, self._cpu = time.perf_counter(), time.process_time()


# ---- evaluation through `fxjax eval` ---------------------------------------------------------------------

def _model_flags(*, model: Path, adapter: Path | None = None, run: Path | None = None,
                 step: int | str | None = None) -> list[str]:
    """The model options of `fxjax eval` naming one phase's detector, with the demo's prompts."""
    flags = ["--model", str(model), "--system-prompt", DEMO["system_prompt"], "--user-prompt", DEMO["user_prompt"]]
    for name, value in (("--adapter", adapter), ("--run", run), ("--step", step)):
        flags += [name, str(value)] if value is not None else []
    return flags


def _eval_args(model_flags: list[str], test_file: Path, out: Path, ev: dict) -> argparse.Namespace:
    """`fxjax eval MODEL_FLAGS --data TEST ... --out OUT` as the command's own parser reads it (so its
    defaults are the command's, whatever options it gains), with no breakdown by generator."""
    from fxjax.commands.eval import parse_eval_args

    return parse_eval_args(
        [*model_flags, "--data", str(test_file), "--limit", str(ev["examples"]), "--batch-size",
         str(ev["batch_size"]), "--max-new-tokens", str(ev["max_new_tokens"]), "--group-by", "--fresh",
         "--no-progress", "--out", str(out)])


def _evaluate(phase: str, model_flags: list[str], test_file: Path, out: Path, ev: dict,
              after=None) -> tuple[dict, Any]:
    """`fxjax eval` of one phase's detector on the held-out file (the command's steps, from its parsed
    arguments to metrics.json in out/phase); returns (metrics + each stage's mean reward, the detector and
    decoder it used, for `fxjax detect`). `after`: the detector of another step of the same run, whose model
    takes this step's LoRA, as `fxjax eval --step alpha beta gamma` does."""
    import numpy as np

    from fxjax import rewards
    from fxjax.commands.eval import eval_records, settings_of, step_detector
    from fxjax.commands.eval_folder import PREDICTIONS, evaluate_detector

    say = lambda text: _say(f"      eval: {text}")  # noqa: E731
    args = _eval_args(model_flags, test_file, out / phase, ev)
    records, report, records_key = eval_records(args, say)
    detector = step_detector(args, args.step[0] if args.step else None)
    args.batch_size = detector.batch_size(args.batch_size, default=8)
    settings = settings_of(args, detector.source, detector.data, detector.tokenizer, records_key)
    summary = evaluate_detector(args, records, report, detector, settings, out / phase, say, after=after)
    rows = [json.loads(line) for line in (out / phase / PREDICTIONS).read_text(encoding="utf-8").splitlines()]
    completions = [r["completion"] for r in rows]
    targets = [{"label": r["label"], "boxes": r["true_boxes"]} for r in rows]
    summary["stage_rewards"] = {stage: float(np.mean(rewards.score(completions, targets, stage=stage)["total"]))
                                for stage in STAGES}
    summary["gamma_reward"] = summary["stage_rewards"]["gamma"]
    return summary, (detector, detector.decoder(args.batch_size, args.max_new_tokens))


def _balanced_prompts(train_file: Path, out_file: Path, seed: int) -> Path:
    """The training records in a seeded order for GRPO without shuffling, balanced twice over: generated and
    real alternate, and the generated ones cycle through where their region starts (the demo's two bands:
    generated-top, real, generated-bottom, real, ...), so every step of 8 prompts gets 4 real images and
    2 generated images of each band.

    Why the labels: a real image earns the IoU term's 1.0 for writing no box, a generated one earns its IoU,
    so with shuffled prompts a step's mean reward mostly follows how many real images it drew.
    Why the bands: with the labels alone, a step's generated images were often all of one band; the row's
    shared bias then got a coherent push each step while the image-dependent reading got a noisy one, and
    GRPO drove some seeds to one row for every image (docs/demo_tuning.md). Records beyond the smallest
    group's share are left out."""
    import numpy as np

    real, generated = [], {}
    for n, line in enumerate(train_file.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if row["label"] == "real":
            real.append(line)
            continue
        if not row.get("regions"):
            raise ValueError(f"{train_file}:{n}: generated record {row.get('id')!r} has no regions to balance by")
        generated.setdefault(row["regions"][0]["bbox"][1], []).append(line)
    if not real or not generated:
        raise ValueError(f"{train_file}: GRPO's balanced prompts need real and generated records; "
                         f"it has {len(real)} real and {sum(map(len, generated.values()))} generated")
    rng = np.random.default_rng((seed, 1))
    real, *bands = [[group[i] for i in rng.permutation(len(group))]
                    for group in (real, *(generated[top] for top in sorted(generated)))]
    cycles = min([len(real) // len(bands)] + [len(b) for b in bands])
    order = []
    for c in range(cycles):
        for k, band in enumerate(bands):
            order += [band[c], real[len(bands) * c + k]]
    out_file.write_text("".join(line + "\n" for line in order), encoding="utf-8")
    return out_file


# ---- detect overlays -------------------------------------------------------------------------------------

def _overlay_records(test_file: Path, counts: dict) -> list[dict]:
    """The first held-out records of each label (their image path and true boxes)."""
    picked, need = [], dict(counts)
    for line in test_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if need.get(row["label"], 0) > 0:
            need[row["label"]] -= 1
            picked.append({"image": str(test_file.parent / row["image"]), "label": row["label"],
                           "boxes": [r["bbox"] for r in row.get("regions", [])]})
    return picked


def _detect(detector, decoder, images: list[dict]) -> list[dict]:
    """`fxjax detect` on the images with a phase's detector (its regions in original-image pixels): its
    inputs and data config as the command builds them."""
    from fxjax.commands.detect import detect, detect_config, detect_inputs

    records, failed, _, fit = detect_inputs([m["image"] for m in images], detector, None)
    if failed:
        raise RuntimeError(f"fxjax detect could not read {failed}")
    config = detect_config(detector, fit, decoder.batch_size, None)
    return detect(records, decoder, config, out=None, emit=lambda result: None)


# ---- the demo --------------------------------------------------------------------------------------------

def run_demo(out: Path | str = "fxjax-demo", *, steps: int | None = None, n_images: int | None = None,
             quick: bool = False, seed: int = 0, overwrite: bool = False) -> int:
    start = time.perf_counter()
    for name, value in (("steps", steps), ("n_images", n_images)):
        if value is not None and value < 1:  # (0 is not "the default": it used to run the default)
            raise ValueError(f"{name} must be a positive integer or None (the default), got {value}")
    check_seed(seed, "seed")
    n_images = n_images if n_images is not None else (QUICK["images"] if quick else DEMO["images"])
    if round(n_images * DEMO["test_fraction"]) == 0:  # before --out is made (make_demo_data named its own keys)
        least = next(n for n in range(1, 100) if round(n * DEMO["test_fraction"]) > 0)
        raise ValueError(f"n_images (--n) {n_images} leaves no held-out images to evaluate on (the demo holds out "
                         f"{DEMO['test_fraction']:.3g} of them): give --n {least} or more")
    out = Path(out).absolute()
    _prepare_dir(out, overwrite)
    phases = _Phases()
    sft_steps = steps if steps is not None else (QUICK["sft_steps"] if quick else DEMO["sft"]["steps"])
    stage_steps = QUICK["stage_steps"] if quick else DEMO["grpo"]["stage_steps"]
    ev = QUICK["eval"] if quick else DEMO["eval"]

    from fxjax.data.demo_data import make_demo_data
    from fxjax.demo_model import make_demo_base_model

    files = make_demo_data(out / "data", n=n_images, seed=seed, test_fraction=DEMO["test_fraction"],
                           min_side=DEMO["sides"][0], max_side=DEMO["sides"][1], multiple=28,
                           fingerprint=DEMO["fingerprint"], max_regions=DEMO["max_regions"],
                           fingerprint_scope=DEMO["fingerprint_scope"], box_multiple=DEMO["box_multiple"],
                           region_layout=DEMO["region_layout"], row_code=DEMO["row_code"],
                           row_code_scope=DEMO["row_code_scope"], artefacts=DEMO["artefacts"], brief=DEMO["brief"],
                           overwrite=True)
    counts = {k: sum(1 for _ in open(v, encoding="utf-8")) for k, v in files.items()}
    phases.done("data", f"demo data (seed {seed}): {counts['train']} train / {counts['test']} held-out images in "
                        f"{out / 'data'}")

    model_dir = out / "base-model"
    n_params, n_task = make_demo_base_model(model_dir, files["train"], seed=seed, task_std=DEMO["embedding_std"],
                                            system_prompt=DEMO["system_prompt"], user_prompt=DEMO["user_prompt"],
                                            min_pixels=_DATA["min_pixels"], max_pixels=_DATA["max_pixels"])
    phases.done("model", f"tiny Qwen2.5-VL ({n_params:,} parameters, random init; the embedding of the {n_task} "
                         f"tokens the training texts use at std {DEMO['embedding_std']}) with the Qwen2.5-VL "
                         f"tokenizer in HF layout: {model_dir}")

    evals: list[tuple[str, dict]] = []
    eval_dirs: list[Path] = []
    overlay_images = _overlay_records(files["test"], QUICK["overlay_images"] if quick else DEMO["overlay_images"])
    overlays: dict[str, list[dict]] = {}

    def held_out(phase: str, title: str, model_flags: list[str], overlay: str | None = None, after=None):
        """`fxjax eval` of one phase; with `overlay`, also `fxjax detect` on the overlay images (that column).
        Returns the phase's detector (`after` of the next step of the same run)."""
        summary, (detector, decoder) = _evaluate(phase, model_flags, files["test"], out / "eval", ev, after)
        evals.append((title, summary))
        eval_dirs.append(out / "eval" / phase)
        if overlay:
            overlays[overlay] = _detect(detector, decoder, overlay_images)
        phases.done(f"eval {phase}", f"fxjax eval, {title}: format {summary['format_rate']:.0%}, verdict "
                                     f"{summary['accuracy']:.0%}, mean IoU {summary['mean_iou'] or 0:.3f} "
                                     f"-> {out / 'eval' / phase}")
        return detector

    held_out("before-sft", "before SFT", _model_flags(model=model_dir), overlay="before SFT")

    from fxjax.train.sft import run_sft
    from fxjax.train_config import from_dict

    import yaml

    config = json.loads(json.dumps(DEMO["sft"]["config"]))
    config["model"]["path"] = str(model_dir)
    config["data"].update(train_files=[str(files["train"])], seed=seed)
    config["train"].update(steps=sft_steps, seed=seed, output_dir=str(out / "sft"))
    # a short run (--quick, --steps) warms up over its first half at most, and still decays
    config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], sft_steps // 2)
    config["export"] = {"adapter_dir": str(out / "sft-adapter")}
    cfg = from_dict(config)
    (out / "sft.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _say(f"    LoRA SFT: {sft_steps} steps (config: {out / 'sft.yaml'}; `fxjax sft --config` reruns it)")
    result = run_sft(cfg, log=lambda text: _say("      " + text))
    if result.preempted:
        _say(f"fxjax demo: interrupted at step {result.steps}; resume with `fxjax sft --config {out / 'sft.yaml'}`")
        return 130
    phases.done("sft", f"SFT: {result.steps} steps, adapter in {out / 'sft-adapter'}")
    held_out("after-sft", "after SFT", _model_flags(model=model_dir, adapter=out / "sft-adapter"), overlay="after SFT")

    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.grpo import run_grpo

    config = json.loads(json.dumps(DEMO["grpo"]["config"]))
    config["model"].update(path=str(model_dir), adapter=str(out / "sft-adapter"))
    prompts = _balanced_prompts(files["train"], out / "data" / "grpo_prompts.jsonl", seed)
    config["data"].update(train_files=[str(prompts)], seed=seed, shuffle=False)
    config["train"].update(seed=seed, output_dir=str(out / "grpo"))
    config["grpo"]["seed"] = seed
    if quick:
        config["grpo"]["max_completion_length"] = QUICK["max_completion_length"]
    config["stages"] = [{"name": s, "steps": stage_steps} for s in STAGES]
    gcfg = grpo_from_dict(config)
    (out / "grpo.yaml").write_text(yaml.safe_dump(gcfg.to_dict(), sort_keys=False))
    g = gcfg.grpo
    _say(f"    GRPO from the SFT adapter: {' -> '.join(f'{s} x {stage_steps}' for s in STAGES)} steps of "
         f"{gcfg.data.batch_size} prompts x {g.num_generations} completions (config: {out / 'grpo.yaml'})")
    grpo = run_grpo(gcfg, log=lambda text: _say("      " + text))
    if grpo.preempted:
        _say(f"fxjax demo: interrupted at step {grpo.steps}; resume with `fxjax grpo --config {out / 'grpo.yaml'}`")
        return 130
    phases.done("grpo", f"GRPO: {grpo.steps} steps; mean training reward, first -> last third of each stage: "
                        f"{stage_trends(grpo.history)}")
    stage_detector = None  # each stage's end: one base model, the stage's LoRA read into it (`--step alpha beta gamma`)
    for stage in STAGES:  # (the run keeps each stage's end: `fxjax eval --run RUN --step alpha`)
        stage_detector = held_out(f"after-{stage}", f"after GRPO {stage}",
                                  _model_flags(model=model_dir, run=out / "grpo", step=stage),
                                  overlay="after GRPO (all stages)" if stage == STAGES[-1] else None,
                                  after=stage_detector)

    from fxjax.commands.export import export_run

    written = export_run(out / "grpo", out / "export", log=lambda text: None)
    agree = _export_agreement(model_dir, Path(written["merged"]), Path(written["adapter"]))
    phases.done("export", f"fxjax export: merged HF checkpoint {written['merged']} and PEFT adapter "
                          f"{written['adapter']} (step {written['step']}); their logits agree to {agree:.1e}")

    from fxjax.commands.eval_report import EVAL_REPORT_FILE, write_eval_report
    from fxjax.commands.report import write_report
    from fxjax.overlay import overlay_sheet

    # (without the wall-clock panels: the PNGs are then the same at every run, docs/'s byte for byte)
    reports = [write_report(out / "sft", out / "report" / "sft_report.png", title="demo: SFT", timings=False),
               write_report(out / "grpo", out / "report" / "grpo_report.png", title="demo: GRPO alpha -> beta -> gamma",
                            timings=False),
               write_eval_report(eval_dirs, out / "report" / EVAL_REPORT_FILE, labels=[t for t, _ in evals],
                                 title=f"demo: held-out evaluation by phase (seed {seed})")]
    sheet = overlay_sheet(overlay_images, overlays, out / "report" / "detect_overlays.png")
    phases.done("report", f"fxjax report and fxjax detect: {', '.join(str(p) for p in reports)}, {sheet}")

    total = time.perf_counter() - start
    _say("\nphase times, wall (cpu): " + ", ".join(f"{name} {s:.0f}s ({c:.0f}s)" for name, s, c in phases.times))
    _say("\nheld-out results (greedy decoding; gamma reward = mean gamma-stage reward of those completions):\n")
    _say(phase_table(evals))
    _say("\nheld-out reward under each GRPO stage's own weights, at the stage's start -> end (same images): "
         + held_out_stage_rewards(evals))
    _say(f"\nreports: {reports[0]}, {reports[1]}\nheld-out metrics by phase: {reports[2]}\noverlays (before SFT | "
         f"after SFT | after GRPO; white: the true region): {sheet}\nwhat GRPO sampled, with its rewards: "
         f"{out / 'grpo' / 'completions.jsonl'}")
    _say(f"\nfxjax demo finished in {total / 60:.1f} min on {_device()}; outputs in {out}")
    if quick:  # (a table of zeros and flat rewards read as a broken install)
        _say(f"(--quick: a smoke run of every phase, {sft_steps} SFT and {len(STAGES)} x {stage_steps} GRPO steps, too "
             f"few to learn anything: zeros and flat rewards above are expected; `fxjax demo` learns the task)")
    # Exit status 1 only when the pipeline is broken: SFT did not teach the format, or the export disagrees.
    ok = (evals[1][1].get("format_rate") or 0) > (evals[0][1].get("format_rate") or 0) and agree < 1e-3
    return 0 if ok or quick else 1


def _export_agreement(model_dir: Path, merged_dir: Path, adapter_dir: Path) -> float:
    """Max |logit difference| between the merged export and the base model with the exported adapter."""
    import numpy as np
    from PIL import Image

    import fxjax
    from fxjax.image_processing import process_image

    merged = fxjax.from_pretrained(merged_dir)
    reloaded = fxjax.from_pretrained(model_dir, adapter=adapter_dir)
    ids = np.array([[151644, 872, 198, 151652] + [151655] * 4 + [151653, 151645]], np.int32)
    pv, grid = process_image(Image.new("RGB", (56, 56), (120, 60, 30)), min_pixels=3136, max_pixels=3136)
    a = np.asarray(merged(ids, pixel_values=pv, image_grid_thw=grid))
    b = np.asarray(reloaded(ids, pixel_values=pv, image_grid_thw=grid))
    return float(np.abs(a - b).max())


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{jax.device_count()} {d.platform} device(s)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
