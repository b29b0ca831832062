"""`fxjax demo`: its table and stage trends (fast), and `--quick`, a smoke run of every phase and of
bench/demo_policy.py on its folder (slow, -m slow: it compiles the SFT, decoding and GRPO programs, 1.5
minutes alone on 2 cores and over 2 more in the 2-worker suite; CI runs the full `fxjax demo` after the tests
and then bench/demo_policy.py on the demo's folder, which it did not while the script broke unnoticed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fxjax.cli import main
from fxjax.demo import _balanced_prompts
from fxjax.demo_summary import STAGES, held_out_stage_rewards, phase_table, stage_trends


def test_table_has_a_row_per_phase_and_the_issue_columns():
    rows = [("before SFT", {"examples": 60, "format_rate": 0.0, "accuracy": 0.0, "f1": None, "mean_iou": 0.0,
                            "gamma_reward": -2.0}),
            ("after SFT", {"examples": 60, "format_rate": 1.0, "accuracy": 0.95, "f1": 0.951, "mean_iou": 0.212,
                           "gamma_reward": 1.133})]
    lines = phase_table(rows).splitlines()
    assert lines[0].startswith("| held-out (60 images) |")
    for column in ("format rate", "verdict acc.", "F1 generated", "mean IoU gen.", "gamma reward"):
        assert column in lines[0]
    assert lines[2] == "| before SFT | 0% | 0% | n/a | 0.000 | -2.000 |"
    assert lines[3] == "| after SFT | 100% | 95% | 0.951 | 0.212 | +1.133 |"


def test_stage_trends_compare_thirds_and_fit_a_slope():
    history = [{"stage": s, "reward/total_mean": float(v)}
               for s, values in zip(STAGES, ([0, 1, 2, 3, 4, 5], [5, 5, 5, 5, 5, 5], [3, 2, 1])) for v in values]
    text = stage_trends(history)
    assert "alpha +0.50 -> +4.50 (slope +1.000 +/- 0.000/step: rises)" in text
    assert "beta +5.00 -> +5.00 (slope +0.000 +/- 0.000/step: no trend beyond noise; a steady rise would show from +0.00 over " \
           "the stage)" in text
    assert "gamma +3.00 -> +1.00 (slope -1.000 +/- 0.000/step: falls)" in text


def test_stage_trends_call_a_slope_within_two_standard_errors_noise():
    """Rewards alternating 1, 3 have a fitted slope (0.171/step) well inside two standard errors (0.280,
    scipy's linregress as the oracle): noise. A rise of 0.5/step with a tenth of that scatter is a trend.
    Two steps have no standard error: no slope is claimed."""
    from scipy.stats import linregress

    noisy = np.array([1.0, 3.0, 1.0, 3.0, 1.0, 3.0])
    x = np.arange(6)

    def trends(values):
        return stage_trends([{"stage": "alpha", "reward/total_mean": float(v)} for v in values])

    fit = linregress(x, noisy)
    assert trends(noisy) == (f"alpha +2.00 -> +2.00 (slope {fit.slope:+.3f} +/- {fit.stderr:.3f}/step: "
                             f"no trend beyond noise; a steady rise would show from {2 * fit.stderr * 5:+.2f} over the stage)")
    # Scatter without a slope of its own: the rise the text names, spread evenly over the 6 steps on top
    # of it, is just called one; 1% less is not.
    flat = np.array([1.0, 3.0, 1.0, 1.0, 3.0, 1.0])
    assert linregress(x, flat).slope == pytest.approx(0.0, abs=1e-12)
    least = float(trends(flat).split("a steady rise would show from ")[1].split(" ")[0])
    assert least == pytest.approx(2 * linregress(x, flat).stderr * 5, abs=0.005)
    assert trends(flat + 1.01 * least * x / 5).endswith(": rises)")
    assert "no trend" in trends(flat + 0.99 * least * x / 5)
    assert trends(2.0 + 0.1 * (noisy - 2.0) + 0.5 * x).endswith(": rises)")
    assert trends(2.0 + 0.1 * (noisy - 2.0) - 0.5 * x).endswith(": falls)")
    assert trends([1.0, 2.0]) == "alpha +1.00 -> +2.00"
    # a long stage's small slope in e-notation (at 3 decimals 1,000 steps rising by 3e-5 each read +0.000)
    long = 2.0 + 3e-5 * np.arange(1000) + 0.001 * np.tile([1.0, -1.0], 500)
    fit = linregress(np.arange(1000), long)
    assert f"(slope {fit.slope:+.2e} +/- {fit.stderr:.2e}/step: rises)" in trends(long)


def test_held_out_stage_rewards_compare_each_stage_start_with_its_end():
    """Each stage is judged by its own weights, from the evaluation before it to the one after it."""
    def ev(alpha, beta, gamma):
        return {"stage_rewards": {"alpha": alpha, "beta": beta, "gamma": gamma}}

    evals = [("before SFT", ev(-1, -2, -3)), ("after SFT", ev(3.0, 4.0, 1.5)), ("after GRPO alpha", ev(3.5, 3.9, 1.6)),
             ("after GRPO beta", ev(3.6, 3.8, 1.7)), ("after GRPO gamma", ev(3.0, 4.4, 1.7))]
    assert held_out_stage_rewards(evals) == ("alpha +3.000 -> +3.500 (rises); beta +3.900 -> +3.800 (falls); "
                                              "gamma +1.700 -> +1.700 (flat)")
    assert held_out_stage_rewards(evals[:3]) == "alpha +3.000 -> +3.500 (rises)"  # a run stopped after alpha


def test_grpo_prompts_balance_labels_and_bands(tmp_path):
    """GRPO's prompt file: the same records in a seeded order, generated and real alternating and the
    generated ones cycling through the bands (top, real, bottom, real, ...: every step of 8 gets 4 real and
    2 of each band), the surplus beyond the smallest group's share left out."""
    rows = ([{"label": "generated", "regions": [{"bbox": [0, 28, 56, 56]}]}] * 4
            + [{"label": "generated", "regions": [{"bbox": [0, 0, 56, 28]}]}] * 3 + [{"label": "real"}] * 7)
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(rows)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _balanced_prompts(tmp_path / "train.jsonl", tmp_path / "p.jsonl", seed=0)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    band = [r["regions"][0]["bbox"][1] if r["label"] == "generated" else "real" for r in got]
    assert band == [0, "real", 28, "real"] * 3  # 3 top-band records: 3 cycles
    assert len({r["id"] for r in got}) == 12
    assert {r["id"] for r, b in zip(got, band) if b == 0} == {"r4", "r5", "r6"}  # every top-band record
    again = _balanced_prompts(tmp_path / "train.jsonl", tmp_path / "q.jsonl", seed=0).read_text()
    assert again == out.read_text()
    other = [_balanced_prompts(tmp_path / "train.jsonl", tmp_path / "o.jsonl", seed=s).read_text() for s in (1, 2, 3)]
    assert any(o != again for o in other)  # the order depends on the seed
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "g", "label": "generated"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: generated record 'g' has no regions"):
        _balanced_prompts(tmp_path / "bad.jsonl", tmp_path / "b.jsonl", seed=0)
    (tmp_path / "real.jsonl").write_text(json.dumps({"id": "x", "label": "real"}) + "\n")
    with pytest.raises(ValueError, match=r"real.jsonl: GRPO's balanced prompts need real and generated records; "
                                         r"it has 1 real and 0 generated"):
        _balanced_prompts(tmp_path / "real.jsonl", tmp_path / "b.jsonl", seed=0)


@pytest.mark.slow
def test_quick_demo_runs_every_phase(tmp_path, capsys, monkeypatch):
    from fxjax import host_allocator

    # (not said in this process yet)
    monkeypatch.setattr(host_allocator, "_state", {"kept": False, "said": False, "cli": False})
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 0
    text = capsys.readouterr().out
    # pytest's process imported JAX: the allocator tip, said once (SFT's, not GRPO's too), none where one is preloaded
    tips = 1 if host_allocator.preloaded_allocator({}) is None else 0
    assert text.count("tip: a CPU run's steps take") == tips
    for phase in ("before SFT", "after SFT", "after GRPO alpha", "after GRPO beta", "after GRPO gamma"):
        assert f"| {phase} |" in text
        assert json.loads((out / "eval" / phase.lower().replace("grpo ", "").replace(" ", "-")
                           / "metrics.json").read_text())["examples"] > 0
    assert "phase times, wall (cpu):" in text
    assert "(--quick: a smoke run of every phase" in text  # (its zeros read as a broken install)
    assert "at the stage's start -> end (same images): alpha " in text and "; gamma " in text
    for png in ("sft_report.png", "grpo_report.png", "eval_report.png", "detect_overlays.png"):
        assert (out / "report" / png).stat().st_size > 1000
    assert (out / "export" / "merged" / "config.json").is_file()
    assert (out / "export" / "adapter" / "adapter_config.json").is_file()
    history = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history if h["kind"] == "train"] == ["alpha", "beta", "gamma"]
    # the seed reaches the data: seed 1's images are not seed 0's
    assert json.loads((out / "data" / "test.jsonl").read_text().splitlines()[0])["id"].startswith("demo-1-")
    # bench/demo_policy.py on the same output: the expected reward per checkpoint and the stage changes
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "demo_policy.py"), str(out),
                           "--samples", "2", "--examples", "8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    means = {line.split(":")[0].strip(): line for line in lines if ": mean reward alpha" in line}
    assert list(means) == ["after SFT", "after alpha", "after beta", "after gamma"]
    assert "sampled boxes' mean IoU, top- / bottom-band generated images" in proc.stdout

    def mean(checkpoint, stage):
        return float(means[checkpoint].split(f"{stage} ")[1].split(",")[0])

    names = list(means)
    for start_name, end_name, stage in zip(names, names[1:], STAGES):  # each stage: the checkpoint before it -> its own
        change = next(line for line in lines if line.startswith(f"  {stage}: ") and "change" in line)
        start, end = (float(v) for v in change.split(":")[1].split(", change")[0].split(" -> "))
        assert (start, end) == (mean(start_name, stage), mean(end_name, stage))
    assert "first digit of y1" in proc.stdout


def test_overlay_outline_reaches_the_true_region_s_last_pixels(tmp_path):
    """The white outline of a true region ends on its last pixels (x2 * scale - 1): drawn at x2 * scale, a
    band on the image's border lost its right and bottom edges (outside the tile)."""
    from PIL import Image

    from fxjax.overlay import overlay_sheet

    Image.new("RGB", (56, 56), (51, 51, 51)).save(tmp_path / "img.png")
    meta = [{"image": tmp_path / "img.png", "boxes": [[0, 28, 56, 56]]}]
    result = {"regions": [], "verdict": "generated", "parsed": True}
    sheet = Image.open(overlay_sheet(meta, {"after SFT": [result]}, tmp_path / "sheet.png", scale=3)).convert("RGB")
    left, top = 6, 22  # the sheet's gap and header: the tile's top-left corner
    white, grey = (255, 255, 255), (51, 51, 51)
    assert sheet.getpixel((left + 167, top + 120)) == white  # the right edge, on the tile's last column
    assert sheet.getpixel((left + 80, top + 167)) == white  # the bottom edge, on the tile's last row
    assert sheet.getpixel((left + 80, top + 84)) == white  # the top edge (y1 = 28 -> 84)
    assert sheet.getpixel((left + 80, top + 83)) == grey and sheet.getpixel((left + 166, top + 120)) == grey


def test_demo_arguments_are_checked_before_any_work(tmp_path, capsys):
    from fxjax.demo import run_demo

    # 0 is not "the default" (it ran the default 200 SFT steps / 960 images)
    for argv in (["--steps", "0"], ["--n", "0"], ["--seed", "-1"], ["--seed", str(2**63)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--out", str(tmp_path / "d"), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {argv[0]}:" in err and ("positive integer" in err or "seed must be in [0, 2**32)" in err)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run_demo(tmp_path / "d", steps=0)
    with pytest.raises(ValueError, match=r"seed: a seed must be in \[0, 2\*\*32\), got -1"):
        run_demo(tmp_path / "d", seed=-1)
    assert not (tmp_path / "d").exists()


def test_an_earlier_demos_results_are_replaced_only_with_overwrite(tmp_path, capsys):
    """`fxjax demo --seed 1` after `fxjax demo` stopped the earlier run's results from being wiped unasked."""
    from fxjax.demo import _MARKER, _prepare_dir

    out = tmp_path / "demo"
    (out / "eval" / "after-sft").mkdir(parents=True)
    (out / "eval" / "after-sft" / "metrics.json").write_text("{}")
    (out / "sft").mkdir()
    (out / _MARKER).write_text("made by fxjax demo\n")
    assert main(["demo", "--out", str(out), "--seed", "1"]) == 2
    assert "holds an earlier demo's results (sft/, eval/); pass --overwrite" in capsys.readouterr().err
    assert (out / "eval" / "after-sft" / "metrics.json").exists()  # nothing touched
    _prepare_dir(out, overwrite=True)
    assert "replacing the earlier demo's results" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [_MARKER]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="was not made by `fxjax demo`"):
        _prepare_dir(tmp_path / "mine", overwrite=True)  # --overwrite never reaches a folder the demo did not make


def test_demo_base_model_draws_only_the_training_texts_tokens_large(tmp_path):
    """The demo's base model: the embedding rows of every token SFT's examples hold (checked against the text
    rendered and encoded here, not through the pipeline) and of the ten digits at std 0.3; the other rows
    as the init drew them (0.02), so the tiny model's uncertainty stays on the task's tokens."""
    from safetensors.numpy import load_file

    from fxjax.data.demo_data import make_demo_data
    from fxjax.data.prompts import render_prompt, render_target
    from fxjax.data.records import load_records
    from fxjax.data.tokenizer import load_tokenizer
    from fxjax.demo import DEMO_SYSTEM_PROMPT, DEMO_USER_PROMPT
    from fxjax.demo_model import make_demo_base_model

    files = make_demo_data(tmp_path / "data", n=12, seed=0, test_fraction=0.25, min_side=56, max_side=56,
                           multiple=28, fingerprint=36.0, max_regions=1, box_multiple=28, region_layout="bands",
                           brief=True)
    model_dir = tmp_path / "base"
    n_params, n_task = make_demo_base_model(model_dir, files["train"], seed=0, task_std=0.3,
                                            system_prompt=DEMO_SYSTEM_PROMPT, user_prompt=DEMO_USER_PROMPT,
                                            min_pixels=3136, max_pixels=12544)
    tok = load_tokenizer(model_dir)
    records, _ = load_records([str(files["train"])])
    texts = [render_prompt(DEMO_SYSTEM_PROMPT, DEMO_USER_PROMPT, 4) + render_target(r, [x.bbox for x in r.regions])
             + "<|im_end|>" for r in records]
    expected = {t for text in texts for t in tok.encode(text, add_special_tokens=False).ids}
    assert {tok.token_to_id(m) for m in ("<think>", "</think>", "<verdict>", "<|box_start|>", "<|image_pad|>",
                                         "<|im_end|>", "generated", "real")} <= expected
    expected |= {tok.token_to_id(d) for d in "0123456789"}
    assert None not in expected and len(records) == 9
    tensors = load_file(str(model_dir / "model-00001-of-00001.safetensors"))
    weights = next(v for k, v in tensors.items() if "embed_tokens" in k)
    rows = np.linalg.norm(weights, axis=1) / np.sqrt(weights.shape[1])  # each row's std, about
    task = np.flatnonzero(rows > 0.1)
    assert expected <= set(task.tolist()) and len(task) == n_task < 200
    assert 0.25 < rows[task].mean() < 0.35
    others = np.delete(rows, task)
    assert 0.017 < others.mean() < 0.023 and others.max() < 0.05
    assert n_params > 9_000_000
