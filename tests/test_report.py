"""`fxjax report`: the panels a reader expects, from small hand-written metrics.jsonl files (SFT and GRPO)."""

from __future__ import annotations

import json
import math
import shutil

from fxjax.cli import main  # noqa: E402
from fxjax.commands.report import build_report, write_report  # noqa: E402
from fxjax.commands.report_drawing import STAGE_BOUNDARY, moving_average, stage_spans  # noqa: E402


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records():
    out = []
    for step in range(1, 41):
        out.append({"step": step, "kind": "train", "loss": 3.0 * math.exp(-step / 15) + 0.2,
                    "learning_rate": 1e-4 * min(1.0, step / 4), "grad_norm": 1.0 / step ** 0.5,
                    "tokens_per_s": 900.0 + step})
        if step % 20 == 0:
            out.append({"step": step, "kind": "eval", "loss": 2.0 - step / 40, "format_rate": step / 40,
                        "verdict_accuracy": 0.5 + step / 100, "mean_iou": 0.1 * step / 20, "examples": 8})
    return out


def grpo_records():
    out = []
    for step in range(1, 31):
        stage = "alpha" if step <= 10 else "beta" if step <= 20 else "gamma"
        fmt = min(1.0, step / 20)
        out.append({"step": step, "kind": "train", "stage": stage, "reward/total_mean": fmt * 2 + step / 30,
                    "reward/format_mean": fmt, "reward/label_mean": 0.5 + step / 70, "reward/iou_mean": 0.3 + step / 100,
                    "reward/iou_relaxed_mean": min(1.0, 1.1 * (0.3 + step / 100)),
                    "weights/w_iou": {"alpha": 1.0, "beta": 1.5, "gamma": 2.0}[stage], "weights/label_plus": 1.0,
                    "weights/format_plus": 2.0, "weights/base": -1.0 if stage == "gamma" else 0.0,
                    "step_time": 2.0, "rollout_time": 1.5, "update_time": 0.5,
                    "format_rate": fmt, "verdict_accuracy": 0.5 + step / 70,
                    "mean_iou_generated": "nan" if step == 3 else step / 60,  # as metrics.jsonl writes a NaN
                    "kl": 0.001 * step, "completion_length_mean": 200 - step, "completion_length_max": 256,
                    "entropy": 1.0, "zero_std_group_fraction": 0.5, "truncated_fraction": 0.0,
                    "learning_rate": 1e-4, "grad_norm": 0.1, "reward/total_std": 0.5, "loss": 0.01 * step,
                    "clip_ratio/region_mean": 0.01 * (step % 3), "clip_ratio/low_mean": 0.0,
                    "clip_ratio/high_mean": 0.01 * (step % 3)})
    out.append({"step": 30, "kind": "eval", "loss": 1.0, "format_rate": 0.9, "verdict_accuracy": 0.8,
                "mean_iou": 0.3, "examples": 8})
    return out


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_sft_report_has_the_loss_and_evaluation_panels(tmp_path, capsys):
    path = write_report(write_metrics(tmp_path / "metrics.jsonl", sft_records()).parent)
    # the numbers beside the figure (an SFT report printed none)
    last = sft_records()[-2]
    err = capsys.readouterr().err
    assert f"fxjax report: last training record (step 40): loss {last['loss']:.4g}" in err
    assert ("fxjax report: last held-out evaluation (step 40): loss 1, format rate 1, verdict accuracy 0.9, mean "
            "IoU 0.2") in err
    assert path == tmp_path / "report.png" and path.stat().st_size > 20_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = build_report(sft_records())
    assert titles(fig) == ["Loss", "Learning rate", "Gradient norm", "Held-out generation (greedy)", "Throughput"]
    assert all(ax.get_xlabel() == "optimiser step" and ax.get_ylabel() for ax in fig.axes)
    generation = fig.axes[3]
    # each held-out series its own hollow shape: three at the same value stay three (the last hid the others)
    points = [line for line in generation.get_lines() if line.get_linestyle() == "None"]
    assert [p.get_marker() for p in points] == ["o", "s", "^"] and {p.get_markerfacecolor() for p in points} == {"none"}
    assert [t.get_text() for t in generation.get_legend().get_texts()] == [
        f"{name} (evaluated at 2 steps)" for name in ("format rate", "verdict accuracy", "mean IoU on generated images")]
    # 40 steps -> raw training loss, its 2-step moving average, and the two held-out points (markers, and a
    # dotted line between them that is not in the legend)
    raw, smooth, held_out, joined = fig.axes[0].get_lines()
    assert list(raw.get_xdata()) == list(range(1, 41)) and list(held_out.get_xdata()) == [20, 40]
    assert held_out.get_linestyle() == "None" and joined.get_linestyle() == ":"
    assert smooth.get_label() == "training" and held_out.get_label() == "held-out (evaluated at 2 steps)"
    assert "thin lines: per step, thick: centred moving average of 3 points" in fig._suptitle.get_text()
    assert fig.axes[0].get_yscale() == "linear"  # the loss falls about 7x: a linear axis shows it
    steep = [dict(r, loss=12 * math.exp(-r["step"] / 5)) if r["kind"] == "train" else r for r in sft_records()]
    log_axis = build_report(steep).axes[0]
    assert log_axis.get_yscale() == "log"  # 12 -> 0.004: on a log axis
    log_axis.figure.canvas.draw()  # (tick labels are made at drawing) 2x and 5x labelled, not decades alone
    minor = {t.get_text() for t in log_axis.get_yticklabels(minor=True) if t.get_text()}
    assert {"0.005", "0.02", "0.05", "0.2", "0.5", "2", "5"} <= minor, minor
    # every panel shares the step axis, so the held-out points line up with the training curves
    assert len({ax.get_xlim() for ax in fig.axes}) == 1


def test_grpo_report_marks_and_names_the_stages_on_every_panel(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", grpo_records())
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "grpo.png")]) == 0
    assert (tmp_path / "grpo.png").stat().st_size > 20_000
    fig = build_report(grpo_records())
    assert titles(fig) == ["Total reward (its weights change with the stage)", "Reward components",
                           "Reward weights of the stage", "Mean IoU on generated images", "KL to the base model",
                           "Completion length", "Groups without signal; truncated completions", "Policy entropy",
                           "Learning rate", "Gradient norm", "GRPO loss", "Clipped importance ratios",
                           "Time per step", "Held-out evaluation (greedy)"]
    # the IoU term the total is made of is R_G (what w_iou multiplies), drawn beside the raw matched IoU
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()][2:] == [
        "IoU term R_G, what w_iou multiplies (real images 1)", "raw matched IoU (real images 1)"]
    w_iou = [line for line in fig.axes[2].get_lines() if line.get_label() == "w_iou (x R_G)"]
    assert [list(line.get_ydata()) for line in w_iou] == [[1.0] * 10]  # (one legend entry; a line per stage)
    for ax in fig.axes:
        names = [t.get_text() for t in ax.texts]
        assert names == ["alpha", "beta", "gamma"], (ax.get_title(), names)
        boundaries = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == STAGE_BOUNDARY)
        assert boundaries == [10.5, 20.5], ax.get_title()
        # a GRPO step is a generation batch (grpo.num_iterations updates), not one optimiser step
        assert ax.get_xlabel() == "GRPO step (one generation batch)", ax.get_title()
    assert "stages alpha 1-10, beta 11-20, gamma 21-30" in fig._suptitle.get_text()
    # the NaN of step 3 is a gap, not a crash or a zero
    iou = [line for line in fig.axes[3].get_lines() if line.get_gid() != STAGE_BOUNDARY][0]
    assert math.isnan(iou.get_ydata()[2])
    # no line crosses a stage boundary: the total reward is drawn per stage (raw and average, 3 x 2 lines), and
    # the average restarts in each stage
    # (the mean's; then the std's)
    total = [line for line in fig.axes[0].get_lines() if line.get_gid() != STAGE_BOUNDARY][:6]
    assert [list(line.get_xdata()) for line in total[::2]] == [list(range(1, 11)), list(range(11, 21)),
                                                               list(range(21, 31))]
    # one entry each, not three; the std over the step's completions beside the mean (TRL's reward_std)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["mean", "std"]
    # the wall-clock panels left out on request (the demo's PNGs are then the same at every run), unnamed
    steady = build_report(grpo_records(), timings=False)
    assert titles(steady) == [t for t in titles(fig) if t != "Time per step"]
    assert "Time per step" not in steady._suptitle.get_text()
    assert "Throughput" not in titles(build_report(sft_records(), timings=False))
    # a panel without values is named, not silently dropped
    records = [{k: v for k, v in r.items() if k != "kl"} for r in grpo_records()]
    fig = build_report(records)
    assert "KL to the base model" not in titles(fig)
    assert "not plotted: KL to the base model (no values in the metrics)" in fig._suptitle.get_text()
    # clip ratios that are all 0 (one update a step: the ratio is 1) say nothing: left out with the reason
    records = [dict(r, **{k: 0.0 for k in r if k.startswith("clip_ratio/")}) for r in grpo_records()]
    fig = build_report(records)
    assert "Clipped importance ratios" not in titles(fig)
    assert ("Clipped importance ratios (all 0: nothing clipped, as with grpo.num_iterations 1, where the ratio is 1)"
            in fig._suptitle.get_text())


def test_terms_of_your_own_their_weights_lone_and_non_finite_values_are_shown(tmp_path, capsys):
    """grpo.reward_funcs terms (reward/<name>_mean, weights/<name>) were in no panel, so the total could not
    be reconciled with the components drawn; a one-step stage and a value between two NaNs were not drawn
    at all once a run had 15 steps, and NaN / inf values left gaps no one was told of."""
    from fxjax.commands.report_drawing import run_kind

    records = [dict(r) for r in grpo_records()]
    for r in records:
        if r["kind"] == "train":
            r.update({"reward/brevity_mean": -0.01 * r["step"], "weights/brevity": 0.5, "reward/tag_match_mean": 0.5,
                      "weights/tag_match": 2.0})
            if r["step"] == 15:
                r["stage"] = "delta"  # a one-step stage
            if r["step"] in (4, 6):
                r["loss"] = "nan" if r["step"] == 4 else "inf"  # step 5's loss between two non-finite ones
    fig = build_report(records)
    own = fig.axes[titles(fig).index("Reward terms of your own (grpo.reward_funcs)")]
    assert titles(fig).index("Reward terms of your own (grpo.reward_funcs)") == 2  # (beside the paper's terms)
    assert [t.get_text() for t in own.get_legend().get_texts()] == ["brevity (weight 0.5)", "tag_match (weight 2)"]
    dots = lambda ax: sorted(x for line in ax.get_lines() if line.get_marker() == "o" for x in line.get_xdata())
    assert dots(own) == [15, 15]  # the one-step stage's value, of each term
    assert dots(fig.axes[titles(fig).index("GRPO loss")]) == [5, 15]
    assert "non-finite, not drawn: mean_iou_generated at step 3; loss at steps 4, 6" in fig._suptitle.get_text()
    assert "non-finite, not drawn: mean_iou_generated at step 3)" in build_report(grpo_records())._suptitle.get_text()
    # the training reward's trend in each stage, in numbers, in the order run (any stage names)
    write_metrics(tmp_path / "metrics.jsonl", records)
    assert main(["report", str(tmp_path)]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "training reward by stage" in x]
    def thirds(stage):
        values = [r["reward/total_mean"] for r in records if r["kind"] == "train" and r["stage"] == stage]
        k = max(1, len(values) // 3)
        return f"{stage} {sum(values[:k]) / k:+.2f} -> {sum(values[-k:]) / k:+.2f}"

    assert line.startswith("fxjax report: training reward by stage (mean of its first third -> last third): "
                           f"{thirds('alpha')} (slope"), line
    assert f"; {thirds('beta')} (slope" in line and f"; {thirds('delta')}; {thirds('gamma')} (slope" in line, line
    # before its first step's record, a GRPO run's evaluations at its stage ends say what it is
    evals = [{"step": 2, "kind": "eval", "tag": "end of stage alpha", "format_rate": 1.0, "verdict_accuracy": 1.0}]
    assert run_kind(evals) == "grpo" and run_kind([dict(evals[0], tag="start")]) == "sft"


def test_stage_spans_and_moving_average():
    recs = [{"step": s, "kind": "train", "stage": n} for s, n in [(1, "a"), (2, "a"), (3, "b"), (4, "a")]]
    assert [(s.name, s.first, s.last) for s in stage_spans(recs)] == [("a", 1, 2), ("b", 3, 3), ("a", 4, 4)]
    # centred on 3 points; none at a NaN (the thick line ran on through a NaN loss, hiding it)
    assert str(moving_average([1.0, 3.0, math.nan, 5.0], 2)) == str([2.0, 2.0, math.nan, 5.0])
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 5) == [2.0, 2.5, 3.0, 3.5, 4.0]


def test_report_errors_name_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"no metrics file at {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 1}\nnot json\n{"step": 2}\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a metrics record" in capsys.readouterr().err


def test_out_names_the_file_written(tmp_path, capsys):
    """--out without .png gets it (the path printed is the file written); --out a directory writes into it."""
    (tmp_path / "run").mkdir()
    run = write_metrics(tmp_path / "run" / "metrics.jsonl", sft_records()).parent
    assert main(["report", str(run), "--out", str(tmp_path / "rep" / "mine")]) == 0
    assert f"wrote {tmp_path / 'rep' / 'mine.png'}" in capsys.readouterr().err
    assert (tmp_path / "rep" / "mine.png").is_file() and not (tmp_path / "rep" / "mine").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "rep") + "/"]) == 0
    assert f"wrote {tmp_path / 'rep' / 'report.png'}" in capsys.readouterr().err
    assert (tmp_path / "rep" / "report.png").is_file()


def test_a_report_that_cannot_be_written_says_how_to_write_it_elsewhere(tmp_path, unwritable_dir, capsys):
    """(A run folder on a read-only disk: "[Errno 30] Read-only file system: .../report.png" said nothing to do.)"""
    (tmp_path / "run").mkdir()
    run = write_metrics(tmp_path / "run" / "metrics.jsonl", sft_records()).parent
    assert main(["report", str(run), "--out", str(unwritable_dir / "r.png")]) == 2
    err = capsys.readouterr().err
    assert f"{unwritable_dir / 'r.png'} (the report cannot be written there: --out FILE.png writes it elsewhere)" in err


def test_a_file_with_two_runs_is_refused_not_half_plotted(tmp_path, capsys):
    grpo = [{"step": s, "kind": "train", "stage": "alpha", "reward/total_mean": 1.0} for s in (1, 2)]
    path = write_metrics(tmp_path / "metrics.jsonl", sft_records() + grpo)  # steps 1, 2 read as the later (GRPO) ones
    assert main(["report", str(tmp_path)]) == 2
    assert f"{path}: holds the training records of an SFT run (38) and of a GRPO run (2)" in capsys.readouterr().err



def test_a_nearly_constant_series_has_no_axis_offset_over_the_stage_names():
    """Entropy 11.9387 +/- 1e-6 over a run: matplotlib's offset text ("1e-6+1.19387e1") sat on the stage
    labels above the panel; the ticks say the values themselves."""
    records = grpo_records()
    for k, r in enumerate(records):
        if r["kind"] == "train":
            r["entropy"] = 11.9387 + 1e-6 * (k % 3)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = build_report(records)
    FigureCanvasAgg(fig).draw()
    (entropy,) = [ax for ax in fig.axes if ax.get_title() == "Policy entropy"]
    assert entropy.yaxis.get_offset_text().get_text() == ""
    assert all("+" not in ax.yaxis.get_offset_text().get_text() for ax in fig.axes)


def test_a_stage_too_narrow_for_its_name_is_not_named_over_its_neighbours():
    """A one-step alpha before 29 steps of beta: "alpha" overprinted "beta" at the top of every panel; a
    stage's name is drawn where it fits (the subtitle lists every stage)."""
    records = [dict(r, stage="alpha" if r["step"] == 1 else "beta") if r["kind"] == "train" else r
               for r in grpo_records()]
    fig = build_report(records)
    assert all([t.get_text() for t in ax.texts] == ["beta"] for ax in fig.axes)
    assert "stages alpha 1-1, beta 2-30" in fig._suptitle.get_text()


def test_a_multiplier_is_in_the_y_label_and_equal_series_and_spikes_stay_visible(tmp_path):
    """The learning rate's "1e-4" sat at the panel's top left, over the stage names: it is in the y label
    now. Two series of equal values (w_iou and label_plus both 1.0 in alpha) drew one line over the other: a
    panel's series have line styles of their own. One gradient-norm spike flattened the rest to 0: a log
    scale where the values span more than 20x. A figure for a paper: --out fig.pdf writes a PDF."""
    fig = build_report(grpo_records())
    (rate,) = [ax for ax in fig.axes if ax.get_title() == "Learning rate"]
    assert rate.get_ylabel() == "learning rate (x 1e\u22124)" and not rate.yaxis.get_offset_text().get_visible()
    (weights,) = [ax for ax in fig.axes if ax.get_title() == "Reward weights of the stage"]
    styles = {line.get_label(): line.get_linestyle() for line in weights.get_lines()
              if line.get_label() in ("w_iou (x R_G)", "label_plus (right verdict)")}
    assert styles == {"w_iou (x R_G)": "-", "label_plus (right verdict)": "--"}, styles
    spiky = [dict(r, grad_norm=5e3 if r["step"] == 7 else 0.4) if r["kind"] == "train" else r for r in grpo_records()]
    (norm,) = [ax for ax in build_report(spiky).axes if ax.get_title() == "Gradient norm"]
    assert norm.get_yscale() == "log" and norm.get_ylabel().endswith(", log scale")
    run = write_metrics(tmp_path / "metrics.jsonl", grpo_records()).parent
    assert main(["report", str(run), "--out", str(tmp_path / "fig.pdf")]) == 0
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-" and not (tmp_path / "fig.pdf.png").exists()


def test_several_runs_are_compared_on_the_same_panels(tmp_path, capsys):
    """`fxjax report RUN_A RUN_B`: every panel with each run's series, a line style per run named in the
    legend; the stages shaded when the runs share them, listed per run when they differ; the own reward
    terms of every run in their panel; each run's reward trend printed; the errors name what is wrong."""
    from fxjax.commands.report_compare import build_comparison

    other = [dict(r, **{"reward/total_mean": r["reward/total_mean"] + 0.5, "reward/brevity_mean": -0.1,
                        "weights/brevity": 0.5}) if r["kind"] == "train" else r for r in grpo_records()]
    a = write_metrics((tmp_path / "seed0").mkdir() or tmp_path / "seed0" / "metrics.jsonl", grpo_records()).parent
    b = write_metrics((tmp_path / "seed4").mkdir() or tmp_path / "seed4" / "metrics.jsonl", other).parent
    assert main(["report", str(a), str(b), "--labels", "seed 0,seed 4"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'compare_report.png'}" in err and (tmp_path / "compare_report.png").stat().st_size > 20_000
    assert "fxjax report: seed 0: training reward by stage" in err and "fxjax report: seed 4: training reward" in err
    fig = build_comparison([("seed 0", grpo_records()), ("seed 4", other)])
    single = titles(build_report(other))
    assert titles(fig) == single  # (the own terms' panel: one run has it, so the comparison has it)
    total = fig.axes[0]
    styles = {line.get_linestyle() for line in total.get_lines() if line.get_color() == "#1f77b4"}
    assert styles == {"-", "--"}  # the mean reward of each run, in its own line style
    legend = [t.get_text() for t in total.get_legend().get_texts()]
    assert legend == ["mean", "std", "seed 0", "seed 4"]
    means = [line for line in total.get_lines() if line.get_color() == "#1f77b4" and line.get_linewidth() == 2]
    assert sorted(tuple(line.get_xdata()) for line in means) == sorted(
        [tuple(range(1, 11)), tuple(range(11, 21)), tuple(range(21, 31))] * 2)  # no line crosses a stage boundary
    for ax in fig.axes:
        assert [t.get_text() for t in ax.texts] == ["alpha", "beta", "gamma"], ax.get_title()
    assert "runs: seed 0 solid, seed 4 dashed; stages alpha 1-10, beta 11-20, gamma 21-30" in fig._suptitle.get_text()
    # other stages: not shaded, each run's listed, each run's lines still stop at its own boundaries
    shifted = [dict(r, stage="alpha" if r["step"] <= 15 else "gamma") if r["kind"] == "train" else r for r in other]
    fig = build_comparison([("seed 0", grpo_records()), ("long alpha", shifted)])
    assert all(not ax.texts for ax in fig.axes)
    assert ("the runs' stages differ (not shaded): seed 0 alpha 1-10, beta 11-20, gamma 21-30; long alpha alpha 1-15, "
            "gamma 16-30") in fig._suptitle.get_text()
    # a run stopped in gamma beside a finished one: the stages they share still shaded (they were not)
    stopped = [r for r in other if r["step"] <= 25]
    fig = build_comparison([("seed 0", grpo_records()), ("stopped", stopped)])
    assert all([t.get_text() for t in ax.texts] == ["alpha", "beta", "gamma"] for ax in fig.axes)
    assert "stages alpha 1-10, beta 11-20, gamma 21-30 (stopped ends at step 25)" in fig._suptitle.get_text()
    # a run without stage records shares none (its label was read as a stopped run's: an IndexError)
    unstaged = [{k: v for k, v in r.items() if k != "stage"} for r in grpo_records()]
    fig = build_comparison([("seed 0", grpo_records()), ("unstaged", unstaged)])
    assert all(not ax.texts for ax in fig.axes) and "the runs' stages differ (not shaded)" in fig._suptitle.get_text()
    fig = build_comparison([("a", unstaged), ("b", unstaged)])
    assert "differ" not in fig._suptitle.get_text()
    # each run's held-out points have a fill of their own (only a faint joining line told them apart)
    fig = build_comparison([("seed 0", grpo_records()), ("seed 4", other)])
    (held_out,) = [ax for ax in fig.axes if ax.get_title() == "Held-out evaluation (greedy)"]
    fills = {(line.get_fillstyle(), str(line.get_markerfacecolor())) for line in held_out.get_lines()
             if line.get_marker() not in ("None", None, "")}
    assert {fill for fill, face in fills if face == "none"} == {"full"} and ("full", "#1f77b4") in fills, fills
    # what cannot be compared
    sft = write_metrics((tmp_path / "sft").mkdir() or tmp_path / "sft" / "metrics.jsonl", sft_records()).parent
    for argv, message in (([str(a), str(sft)], "the runs compared must be of one kind: seed0 is GRPO, sft is SFT"),
                          ([str(a), str(b), "--labels", "one"], "--labels: 1 names for 2 runs"),
                          ([str(a), str(b), *(str(shutil.copytree(a, tmp_path / f"copy{i}")) for i in range(3))],
                           "a comparison draws 2 to 4 runs (a line style each), got 5"),
                          ([str(a), str(a)], f"{a} given more than once: give each run or eval folder once")):
        assert main(["report", *argv]) == 2
        assert message in capsys.readouterr().err


def test_drawing_reports_leaves_the_callers_matplotlib_backend(tmp_path):
    """`matplotlib.use("Agg")` in each report switched a notebook's backend (its inline plots stopped showing)
    once pyplot was imported; the reports draw on a Figure of their own and save it, which needs no backend."""
    import matplotlib
    import matplotlib.pyplot as plt

    from fxjax.commands.report_compare import build_comparison

    before = plt.get_backend()
    plt.switch_backend("svg")  # (stands for a notebook's inline backend)
    try:
        run = write_metrics(tmp_path / "metrics.jsonl", grpo_records()).parent
        assert write_report(run).stat().st_size > 20_000
        build_comparison([("a", grpo_records()), ("b", grpo_records())])
        assert matplotlib.get_backend() == "svg"
    finally:
        plt.switch_backend(before)
