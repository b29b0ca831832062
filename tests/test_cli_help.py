"""The command line answers --help and argument errors at once: nothing imports jax until a command runs.
Also the help texts that state facts of the code state them right."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fxjax.cli import build_parser

# Run main(argv) in a fresh interpreter; print the exit code, then whether jax (or anything heavy) loaded.
PROBE = """
import sys
from fxjax.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("jax", "flax", "transformers", "torch", "grain", "fxjax.train") if m in sys.modules)
print(code, ",".join(heavy) or "-")
"""


def subcommands() -> list[str]:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return sorted(action.choices)


def run_probe(argv: list[str]) -> str:
    """The probe's output: main's exit code, then what heavy module it imported ("-" for none)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([c, "--help"] for c in subcommands()),
                                  ["sft"], ["detect"], ["no-such-command"]],
                         ids=lambda argv: " ".join(argv))
def test_help_and_argument_errors_answer_without_importing_jax(argv):
    out = run_probe(argv)
    code, heavy = out.split()
    assert code == ("0" if "--help" in argv or "--version" in argv else "2")
    assert heavy == "-", f"fxjax {' '.join(argv)} imported {heavy}"  # (what made --help slow: no timed assert)


def test_version_names_fxjax_and_the_packages_a_bug_report_needs(capsys):
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from fxjax.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    text = capsys.readouterr().out.strip()
    assert "\n" not in text  # (one line, whatever the terminal's width)
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert text.startswith(f"fxjax {project['version']} (jax {version('jax')}, jaxlib {version('jaxlib')}, "
                           f"flax {version('flax')}, "), text
    assert f"transformers {version('transformers')}; Python {sys.version.split()[0]})" in text


def test_a_missing_config_file_fails_before_jax():
    out = run_probe(["sft", "--config", "/nonexistent/sft.yaml"])
    assert out == "2 -"


def test_help_states_the_demo_values(capsys):
    from fxjax.demo import DEMO

    with pytest.raises(SystemExit):
        build_parser().parse_args(["make-demo-data", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"`fxjax demo` uses {DEMO['fingerprint']:g})" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DEMO['sft']['steps']};" in text and f"(default: {DEMO['images']};" in text


def test_a_missing_model_directory_is_named_as_missing(tmp_path):
    from fxjax.data.tokenizer import load_tokenizer

    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "Qwen2.5-VL-3B-Instruct")
    assert str(err.value) == (f"{tmp_path / 'Qwen2.5-VL-3B-Instruct'} does not exist (expected a model or "
                              f"tokenizer directory holding tokenizer.json)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path / "empty")


def test_a_file_where_a_model_or_tokenizer_folder_belongs_is_named_not_a_parser_traceback(tmp_path, capsys):
    """A config (or any other file) given as the tokenizer reached tokenizers' parser: "Exception: expected
    value at line 1 column 1", a traceback naming no file; sft took a file for model.path until then."""
    from fxjax.cli import main
    from fxjax.data.tokenizer import load_tokenizer

    config = tmp_path / "sft.yaml"
    config.write_text("train:\n  steps: 1\n")
    with pytest.raises(ValueError, match=rf"{config} is not a tokenizer.json \(.*\); give a model or tokenizer "
                                         r"directory holding tokenizer.json"):
        load_tokenizer(config)
    data = tmp_path / "train.jsonl"
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    data.write_text('{"image": "a.png", "label": "real"}\n')
    base = ["--config", str(config), "--set", f"data.train_files=[{data}]"]
    for key, expected in (("model.path", f"model.path: {config} is a file; give the HF checkpoint's folder"),
                          ("data.tokenizer", f"{config} is not a tokenizer.json")):
        extra = [] if key == "model.path" else ["--set", "model.preset=tiny"]
        assert main(["sft", *base, *extra, "--set", f"{key}={config}"]) == 2
        assert f"fxjax sft: error: {expected}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["sft", *base, "--set", "model.preset=tiny", "--set", f"data.tokenizer={tmp_path / 'empty'}"]) == 2
    assert f"fxjax sft: error: data.tokenizer: no tokenizer.json in {tmp_path / 'empty'}" in capsys.readouterr().err
    assert main(["data", "check", str(data), "--tokenizer", str(config)]) == 2
    assert f"fxjax data check: error: {config} is not a tokenizer.json" in capsys.readouterr().err


def test_odd_inputs_get_messages_that_say_what_is_wrong(tmp_path, capsys):
    """Messages that misled: a config folder was "not found", a non-UTF-8 config named no file, a file as
    --run "does not exist", YAML keys of mixed types a TypeError, `export --adapter-only --tokenizer` ignored
    the flag, `demo --n 3` spoke of make-demo-data's test_fraction and left --out behind."""
    from fxjax.cli import main

    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\xff\xfe\x00 weights")
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("1: x\nfoo: y\n")
    cases = [(["sft", "--config", str(tmp_path)], f"config file {tmp_path} is a directory; give the YAML file"),
             (["sft", "--config", str(binary)], f"{binary}: not UTF-8 text (invalid start byte at byte 0)"),
             (["sft", "--config", str(mixed)], "unknown keys: 1; foo; the config takes"),
             (["export", "--run", str(binary), "--out", str(tmp_path / "ex")],
              f"run directory {binary} is a file; give the run's folder"),
             (["export", "--run", str(tmp_path), "--out", str(tmp_path / "ex"), "--adapter-only", "--tokenizer",
               str(tmp_path)], "--tokenizer: the tokenizer goes into OUT/merged, which --adapter-only does not write"),
             (["demo", "--n", "3", "--out", str(tmp_path / "demo")],
              "fxjax demo: error: n_images (--n) 3 leaves no held-out images to evaluate on (the demo holds out 0.167 "
              "of them): give --n 4 or more")]  # (once: it read "demo: error: demo: n_images")
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"fxjax {argv[0]}: error: ") and message in err, err
    assert not (tmp_path / "demo").exists()


def test_a_bad_number_is_said_in_one_wording_by_every_command(capsys):
    """Five wordings once said one mistake: argparse's "invalid int value: 'x'", "--batch-size must be >= 1"
    (after parsing, without "argument"), "n (--n) must be positive", "must be a positive integer", "--bins and
    --threads must be at least 1". Every numeric flag now says it at parse time, one way."""
    from fxjax.cli import main

    cases = [(["make-demo-data", "d", "--n", "0"], "--n", "must be a positive integer, got 0"),
             (["make-demo-data", "d", "--multiple", "x"], "--multiple", "expected an integer, got 'x'"),
             (["make-demo-data", "d", "--fingerprint", "x"], "--fingerprint", "expected a number, got 'x'"),
             (["make-demo-data", "d", "--row-code", "inf"], "--row-code", "expected a finite number, got 'inf'"),
             (["demo", "--steps", "0"], "--steps", "must be a positive integer, got 0"),
             (["init", "d", "--seed", "-1"], "--seed", "a seed must be in [0, 2**32), got -1"),
             (["eval", "--data", "a.jsonl", "--limit", "0"], "--limit", "must be a positive integer, got 0"),
             (["eval", "--data", "a.jsonl", "--max-image-pixels", "-1"], "--max-image-pixels",
              "must be a positive integer, got -1"),
             (["eval", "--data", "a.jsonl", "--batch-size", "two"], "--batch-size", "expected an integer, got 'two'"),
             (["detect", "a.png", "--max-new-tokens", "0"], "--max-new-tokens", "must be a positive integer, got 0"),
             (["detect", "a.png", "--max-length", "0"], "--max-length", "must be a positive integer, got 0"),
             (["detect", "a.png", "--max-image-pixels", "0"], "--max-image-pixels", "must be a positive integer, got 0"),
             (["data", "check", "a.jsonl", "--bins", "0"], "--bins", "must be a positive integer, got 0"),
             (["data", "check", "a.jsonl", "--threads", "1.5"], "--threads", "expected an integer, got '1.5'"),
             (["data", "check", "a.jsonl", "--min-pixels", "0"], "--min-pixels", "must be a positive integer, got 0")]
    for argv, flag, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        command = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
        assert stop.value.code == 2 and f"fxjax {command}: error: argument {flag}: {message}\n" in \
            capsys.readouterr().err, argv


def test_the_output_folder_of_init_and_make_demo_data_is_also_out(tmp_path, capsys):
    """Every other command that writes a folder spells it --out (selfcheck: --workdir, kept as an alias);
    `fxjax init --out DIR` was "the following arguments are required: OUT"."""
    from fxjax.cli import build_parser, main

    assert build_parser().parse_args(["selfcheck", "--out", "w"]).workdir == "w"
    assert main(["make-demo-data", "--out", str(tmp_path / "data"), "--n", "10", "--min-side", "32",
                 "--max-side", "32"]) == 0
    assert (tmp_path / "data" / "train.jsonl").is_file()
    for argv, message in ((["init"], "the following arguments are required: OUT (or --out DIR)"),
                          (["init", "a", "--out", "b"], "give the output folder once: OUT (a) or --out (b)")):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"fxjax init: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--out", "{file}"], ["export", "--run", "{file}", "--out", "{file}"],
                                  ["make-demo-data", "{file}"]], ids=lambda argv: argv[0])
def test_an_out_that_is_a_file_is_an_error_naming_it(argv, tmp_path, capsys):
    from fxjax.cli import main

    file = tmp_path / "notes.txt"
    file.write_text("not a directory\n")
    assert main([a.format(file=file) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fxjax {argv[0]}: error: ") and str(file) in err and "ot a directory" in err, err


def test_python_dash_m_fxjax_is_the_fxjax_command():
    proc = subprocess.run([sys.executable, "-m", "fxjax", "no-such-command"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage: fxjax " in proc.stderr and "invalid choice: 'no-such-command'" in proc.stderr


def test_an_unknown_argument_is_said_by_the_commands_own_parser(capsys):
    """`fxjax export --step alpha beta` printed fxjax's top-level usage; the command's usage names the
    command, and several steps are said to be eval's."""
    from fxjax.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["export", "--run", "r", "--step", "alpha", "beta", "--out", "y"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("usage: fxjax export ")
    assert err.strip().endswith("fxjax export: error: unrecognized arguments: beta (several steps: fxjax eval only)")
    with pytest.raises(SystemExit) as exit:  # detect's second step went to its images: "2: no such file", status 1
        main(["detect", "--run", "r", "--step", "1", "2", "a.png"])
    assert exit.value.code == 2 and capsys.readouterr().err.strip().endswith(
        "fxjax detect: error: --step takes one step here; 2 is no image (several steps: fxjax eval only)")
    with pytest.raises(SystemExit):  # a stray word elsewhere is not taken for a second step
        main(["export", "--run", "x", "--out", "y", "--step", "3", "--dtype", "float32", "extra"])
    assert capsys.readouterr().err.strip().endswith("fxjax export: error: unrecognized arguments: extra")
    with pytest.raises(SystemExit):
        main(["eval", "--data", "d.jsonl", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: fxjax eval ") and err.strip().endswith("fxjax eval: error: unrecognized arguments: --bogus")
    # a misspelt command or flag: the nearest one named (argparse listed the choices, or nothing)
    for argv, said in ((["stf"], "invalid choice: 'stf' (choose from 'selfcheck', "),
                       (["eval", "--data", "d.jsonl", "--stp", "3"], "fxjax eval: error: unrecognized arguments: --stp 3"),
                       (["data", "chek"], "invalid choice: 'chek' (choose from 'check')")):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert said in err and err.endswith(f" (did you mean {'sft' if argv == ['stf'] else '--step' if 'eval' in argv else 'check'}?)"), err


def test_a_training_runs_invalid_record_names_its_kind_and_how_to_see_every_one(tmp_path, capsys, tokenizer_dir):
    """`fxjax sft` stops at the first invalid record (data.on_error: raise); it said "train.jsonl:2: missing
    image: ..." with neither the kind nor a word of `fxjax data check` or data.on_error=skip."""
    from fxjax.cli import main

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": "a.png", "label": "real"}\n{"image": "gone.png", "label": "real"}\n')
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{preset: tiny}}\ndata: {{train_files: [{data}], tokenizer: {tokenizer_dir}}}\n"
                      f"train: {{steps: 1, output_dir: {tmp_path / 'run'}}}\n")
    assert main(["sft", "--config", str(config), "--set", "data.seed=3"]) == 2
    err = capsys.readouterr().err
    assert f"fxjax sft: error: {data}:2: missing image: " in err
    assert (f" [image_missing] (`fxjax data check --config {config} --set data.seed=3` lists every invalid record; "
            f"--set data.on_error=skip trains without them)") in err  # (with the run's own --set: its files)
    assert not (tmp_path / "run").exists()  # (refused after its lock was taken: the folder it made went again)


def test_ctrl_c_outside_a_training_loop_is_one_line_and_status_130(monkeypatch, capsys):
    """A KeyboardInterrupt out of a command (Ctrl-C while a model loads, compiles or decodes) printed a
    traceback, and when it landed in an XLA compilation the interpreter's exit crashed (status 139). From
    Python (main([...]) in a notebook) the caller gets the KeyboardInterrupt after the same line: an exit
    there ended the notebook's kernel."""
    code = ("import sys, fxjax.commands.report as report\n"
            "def run(args):\n    raise KeyboardInterrupt\n"
            "report.run = run\n"
            "sys.argv = ['fxjax', 'report', '.']\n"
            "from fxjax.cli import main\nsys.exit(main())\n")  # (the console script's call: its own command line)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == ("fxjax report: interrupted (Ctrl-C); running the same command again resumes or "
                                   "redoes it") and "Traceback" not in proc.stderr
    import fxjax.commands.report as report
    from fxjax.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["report", "."])
    assert capsys.readouterr().err.strip().startswith("fxjax report: interrupted (Ctrl-C)")


@pytest.mark.parametrize("sig, ignored", [("SIGTERM", False), ("SIGHUP", False), ("SIGHUP", True)])
def test_sigterm_or_sighup_outside_a_training_loop_is_one_line_and_the_signals_status(sig, ignored):
    """SIGTERM / SIGHUP (a preemption, a cancelled job, a closed SSH session) ended `fxjax eval`, `detect` or
    `export` silently. Now the command says it stopped and that the same command resumes, with the status a
    shell gives a command that signal ended (128 + its number); a signal the process started ignoring (nohup)
    stays ignored."""
    code = ("import os, signal, sys, time, fxjax.commands.report as report\n"
            "def run(args):\n    os.kill(os.getpid(), signal.%s)\n    time.sleep(0.5)\n    print('ran on')\n"
            "    return 0\n"
            "report.run = run\n"
            "signal.signal(signal.%s, signal.%s)\n"  # (as the process started: the suite may run under nohup)
            "sys.argv = ['fxjax', 'report', '.']\n"
            "from fxjax.cli import main\nsys.exit(main())\n") % (sig, sig, "SIG_IGN" if ignored else "SIG_DFL")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if ignored:
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ran on\n", "")
        return
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert proc.stderr.strip() == (f"fxjax report: stopped by {sig}; running the same command again resumes or "
                                   "redoes it") and proc.stdout == ""


def test_output_piped_into_head_ends_quietly():
    """`fxjax info 3b | head -1` printed "fxjax info: error: [Errno 32] Broken pipe" and exited 2: a reader
    that has what it wanted is not an error of the command (status 141, a SIGPIPE'd command's, and no word).
    (Here the pipe's reader is gone before the command writes: what `head` does after its first line.)"""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "fxjax", "info", "3b"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_fxjax_docs_prints_every_document_the_help_texts_and_messages_cite(capsys):
    """Help texts and messages cite docs/NAME.md, which a `pip install` has no repository to open: `fxjax docs`
    lists the documents with their titles and `fxjax docs NAME` (or docs/NAME.md) prints one as written.
    Every docs/NAME.md that fxjax's code cites is one it can print."""
    import re
    from pathlib import Path

    from fxjax.cli import main

    root = Path(__file__).resolve().parents[1]
    assert main(["docs"]) == 0
    listing = capsys.readouterr().out
    on_disk = sorted(p.stem for p in (root / "docs").glob("*.md"))
    assert [line.split()[0] for line in listing.splitlines()[:len(on_disk)]] == on_disk
    assert "Datasets: the records fxjax reads" in listing  # (docs/data.md's title)
    for name in ("data", "docs/format.md"):
        assert main(["docs", name]) == 0
        assert capsys.readouterr().out == (root / "docs" / f"{Path(name).stem}.md").read_text(encoding="utf-8")
    cited = {m for folder in ("fxjax", "train", "rewards", "model") for p in (root / folder).rglob("*.py")
             for m in re.findall(r"docs/([a-z_]+)\.md", p.read_text(encoding="utf-8"))}
    assert {"data", "format", "rewards"} <= cited and sorted(cited - set(on_disk)) == []
    assert main(["docs", "datasets"]) == 2
    assert "no document named 'datasets'; there are: data, " in capsys.readouterr().err
    # the README too (help texts and docs cite its sections), whole or one section
    assert main(["docs", "README.md"]) == 0
    assert capsys.readouterr().out == (root / "README.md").read_text(encoding="utf-8")
    assert main(["docs", "readme", "--section", "from trl"]) == 0
    trl = capsys.readouterr().out
    assert trl.startswith("### Coming from TRL\n") and "| `save_total_limit`, `output_dir`" in trl
    assert "## After training" not in trl and trl in (root / "README.md").read_text(encoding="utf-8")
    assert main(["docs", "readme", "--section", "nothing like it"]) == 2
    assert "--section 'nothing like it': no heading of readme contains it; its headings: fxjax; Set-up;" in \
        capsys.readouterr().err


def test_a_users_slips_are_named_as_the_flag_or_key_they_are(tmp_path, tokenizer_dir, capsys):
    """A CLI walk-through's findings: `data check --config sft FILE` refused the FILE (the shipped sft leaves
    data.train_files empty) and read the data as GRPO does (sft has no train.steps); a --root that is not there
    made every record's image "missing"; a folder as data.train_files got past the start-up check; argparse
    named its helper ("invalid _seed value"); `fxjax data check` said "fxjax data: error"; `report` of one run
    twice drew it over itself and `--out ''` wrote ./report.png; `info` of a PEFT adapter said "not a run";
    `detect --tokenizer DIR` told to pass --tokenizer."""
    from fxjax.cli import main
    from fxjax.presets import CONFIG_DIR

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": "a.png", "label": "real"}\n')
    model = tmp_path / "model"  # (a model folder's config.json, for the --tokenizer slip below)
    model.mkdir()
    (model / "config.json").write_text("{}")
    check = ["data", "check", "--config", "sft", "--set", "model.preset=tiny", "--set",
             f"data.tokenizer={tokenizer_dir}"]
    for extra, kind in (([], "sft"), (["--kind", "grpo"], "grpo")):
        assert main([*check, *extra, str(data)]) == 0
        # (and which file that name read: a ./sft.yaml of the user's would win, as in `fxjax sft`)
        assert (f"fxjax data check: {data} (as `fxjax {kind} --config sft` reads them: the config fxjax ships, "
                f"{CONFIG_DIR / 'sft.yaml'})") in capsys.readouterr().out
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "r": 4, "lora_alpha": 8, "base_model_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct",
        "target_modules": ["model.visual.blocks.0.attn.qkv", "model.language_model.layers.0.self_attn.q_proj"]}))
    assert main(["info", str(adapter)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "PEFT adapter: r 4, lora_alpha 8, 2 modules (1 in the vision encoder and merger)",
        "base: Qwen/Qwen2.5-VL-3B-Instruct"]
    (tmp_path / "bad.jsonl").write_text('{"image": "nope.png", "label": "real"}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 1.0}\n')
    errors = [(["data", "check", str(data), "--root", str(tmp_path / "nope")],
               f"fxjax data check: error: --root: {tmp_path / 'nope'} does not exist"),
              (["data", "check", "/dev/null"], "dataset file /dev/null is not a regular file"),
              (["eval", "--model", str(model), "--data", str(tmp_path / "bad.jsonl"), "--root",
                str(tmp_path / "nope")], f"fxjax eval: error: --root: {tmp_path / 'nope'} does not exist"),
              (["eval", "--model", str(model), "--data", str(tmp_path / "bad.jsonl"), "--out",
                str(tmp_path / "ev"), "--root", str(tmp_path)],
               f"{tmp_path / 'bad.jsonl'}:1: missing image: image {tmp_path / 'nope.png'} does not exist "
               f"[image_missing] (`fxjax data check {tmp_path / 'bad.jsonl'} --root={tmp_path}` lists every invalid "
               "record; --on-error skip evaluates without them)"),
              (["data", "check", str(data), "--kind", "sft"],
               "fxjax data check: error: --kind says how --config's run reads its data; give the config"),
              (["sft", "--config", "sft", "--set", "model.preset=tiny", "--set", f"data.tokenizer={tokenizer_dir}",
                "--set", f"data.train_files=[{tmp_path}]", "--set", "train.steps=1"],
               f"fxjax sft: error: data.train_files: {tmp_path} is a folder; give the JSONL files in it"),
              (["report", str(run), str(run) + "/"], "given more than once: give each run or eval folder once"),
              (["report", str(run), str(run / "metrics.jsonl")], "given more than once"),  # (its file: the run)
              (["report", str(run), "--out", ""], "fxjax report: error: --out: give a file or a folder"),
              (["info", str(Path(__file__).parents[1] / "configs" / "sft.yaml")],
               "a run config (data, lora, model, train), not a model preset"),
              (["detect", str(tmp_path / "a.png"), "--model", str(tmp_path), "--tokenizer", str(tmp_path)],
               f"fxjax detect: error: --model: {tmp_path} holds no config.json: not an HF model folder"),
              (["detect", str(tmp_path / "a.png"), "--model", str(model), "--tokenizer", str(tmp_path)],
               f"fxjax detect: error: --tokenizer: {tmp_path} holds no tokenizer.json")]
    for argv, message in errors:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "1.5"])
    assert "argument --seed: expected an integer, got '1.5'" in capsys.readouterr().err


def test_a_device_out_of_memory_is_one_line_saying_what_to_change(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED (a 4513 x 2999 image shrunk to 8030 tokens, on a CPU: 137 GB for the vision
    encoder's attention) ended `fxjax detect` in a traceback naming nothing to change; now one line with what
    to lower for the command. Other runtime errors keep their traceback."""
    import jax

    import fxjax.commands.detect as detect
    from fxjax.cli import main

    def out_of_memory(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 137526805184 bytes.\nmore")

    monkeypatch.setattr(detect, "run", out_of_memory)
    assert main(["detect", "--run", "r", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err == ("fxjax detect: error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating "
                   "137526805184 bytes.): give a lower --max-pixels (fewer image tokens) or --batch-size\n")

    for other in ("INTERNAL: something else", "RESOURCE_EXHAUSTED: the coordination service's gRPC quota"):
        def fails(args, text=other):
            raise jax.errors.JaxRuntimeError(text)

        monkeypatch.setattr(detect, "run", fails)
        with pytest.raises(jax.errors.JaxRuntimeError, match=other.split(":")[0]):
            main(["detect", "--run", "r", "x.png"])


def test_the_exit_statuses_are_listed_in_the_help_and_the_readme_alike(capsys):
    """A script around fxjax needs what each status means (data check and detect say 1 for inputs they could
    not use, training 3 for a non-finite stop): one list, at the end of `fxjax --help` and in the README."""
    from fxjax.cli import EXIT_STATUS, main

    with pytest.raises(SystemExit):
        main(["--help"])
    said = " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert " ".join(EXIT_STATUS.split()) in said
    assert " ".join(EXIT_STATUS.split()).replace("Exit status:", "Exit status (the end of `fxjax --help` says it "
                                                                 "too):") in readme
