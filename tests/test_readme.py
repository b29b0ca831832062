"""The README's examples run as written: its Python API example end to end, every `fxjax` command line it
shows parses, and each `fxjax sft` command's config (file + --set overrides) loads and validates."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from fxjax.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_blocks(language: str) -> list[str]:
    """The code blocks of the README whose fence names `language` ("" for a bare fence)."""
    blocks, current, lang = [], None, None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang == language:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def fxjax_commands() -> list[list[str]]:
    """Every `fxjax ...` command line in the README's bash and plain code blocks, without comments."""
    out = []
    for block in fenced_blocks("bash") + fenced_blocks(""):
        for line in block.replace("\\\n", " ").splitlines():  # join continued lines
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words[:1] == ["fxjax"]:
                    out.append(words[1:])
    return out


def test_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    python_blocks = fenced_blocks("python")[:2]  # one session: the second continues the first
    assert len(fenced_blocks("python")) == 4  # the third, training, and the fourth, serving, are the next tests'
    (init,) = [c for c in fxjax_commands() if c[:2] == ["init", "tiny-qwen"]]
    monkeypatch.chdir(tmp_path)
    assert main(init) == 0
    scope: dict = {}  # (the example writes its photo.png itself)
    for block in python_blocks:
        exec(compile(block, str(README), "exec"), scope)
    logits, tokens, input_ids = scope["logits"], scope["tokens"], scope["input_ids"]
    n = input_ids.shape[1]
    assert logits.shape == (1, n, 151936)
    assert tokens.shape == (1, n + 16) and np.array_equal(tokens[0, :n], input_ids[0])
    assert (input_ids == 151655).sum() == int(np.prod(scope["image_grid_thw"])) // 4 > 1
    assert np.array_equal(tokens[0, n], np.argmax(np.asarray(logits)[0, -1]))  # greedy continues the logits
    assert (tmp_path / "tiny-qwen-copy" / "config.json").is_file()
    assert capsys.readouterr().out.strip()  # the decoded completion was printed
    result = scope["result"]  # the Python detector: an untrained model's answer, shown raw with a note
    assert result["image"] == "<PIL image 0>" and result["verdict"] is None and not result["parsed"]
    assert result["note"].startswith("the answer has no <verdict>")
    metrics = scope["metrics"]  # the Python eval: the command's metrics.json of the one real photo
    assert metrics["examples"] == 1 and metrics["accuracy"] == 0.0 and metrics["confusion"]["real"]["none"] == 1
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()
    # the traceable example: a finite loss, and a gradient for (only) the LoRA parameters
    grads = nnx.to_flat_state(scope["grads"])
    assert np.isfinite(float(scope["loss"])) and grads and all(path[-1] in ("lora_a", "lora_b") for path, _ in grads)
    assert any(np.abs(np.asarray(g[...])).max() > 0 for _, g in grads)


def test_serving_example_answers_as_fxjax_detect(tmp_path, monkeypatch, capsys):
    """The README's transformers-only serving block, on a merged export written by fxjax's export code,
    writes what `fxjax detect --model` writes for the same image: the same prompts, image inputs and
    positions (without mm_token_type_ids transformers would place the image tokens as text)."""
    import json

    from PIL import Image
    from skimage import data

    import fxjax
    from fxjax.config_sections import DataSection
    from fxjax.train.export import save_merged

    serve = fenced_blocks("python")[3]
    assert "max_new_tokens" not in serve.split("generate(")[1].split(")\n")[0]  # (the export's length, below)
    (init,) = [c for c in fxjax_commands() if c[:2] == ["init", "tiny-qwen"]]
    monkeypatch.chdir(tmp_path)
    assert main(init) == 0
    Path("swift.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "<image>Real?"},
                                                            {"role": "assistant", "content": "x"}]}) + "\n")
    save_merged(fxjax.from_pretrained("tiny-qwen", dtype="float32"), "export/grpo-300/merged",
                data=DataSection(max_pixels=112 * 112, system_prompt="Find the artefacts.",
                                 train_files=("swift.jsonl",)))
    # the sampling settings Qwen2.5-VL-Instruct's generation_config.json ships (an export copies its base's):
    # generate(do_sample=False) would still apply their repetition penalty, which fxjax's decoding does not
    generation = Path("export/grpo-300/merged/generation_config.json")
    # (and the answer length the run evaluated with, as an export records it: 24 here, a random model never stops;
    # the block decodes up to it, as detect does: it passed max_new_tokens=1024, which went past it)
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "do_sample": True, "max_new_tokens": 24,
                                      "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}))
    # a phone-like photo: stored sideways with an EXIF orientation, and with an alpha channel (put on white)
    rgba = np.dstack([data.astronaut(), np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgba[:, :300]).save("photo.png", exif=exif)
    scope: dict = {}
    exec(compile(serve, str(README), "exec"), scope)
    capsys.readouterr()
    assert main(["detect", "photo.png", "--model", "export/grpo-300/merged", "--json", "--max-new-tokens", "24"]) == 0
    detected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scope["photo"].size == (512, 300)  # displayed upright: 300 x 512 stored, turned by EXIF
    assert (scope["prompts"]["system"], scope["prompts"]["user"]) == ("Find the artefacts.",
                                                                      fxjax.data.prompts.USER_TEMPLATES[0])
    # data.prompts "auto": ms-swift records keep theirs, and the export says so; its chat template defaults to
    # Qwen's system prompt, what such records without a system text trained with
    assert "ms-swift records with their own prompts (swift.jsonl" in scope["prompts"]["note"]
    from fxjax.train.export import template_defaults_to

    assert template_defaults_to(Path("export/grpo-300/merged"), fxjax.data.prompts.QWEN_DEFAULT_SYSTEM)
    assert not template_defaults_to(Path("export/grpo-300/merged"), "Find the artefacts.")
    assert scope["answer"] == detected["completion"] and len(scope["out"][0]) == scope["input_ids"].shape[1] + 24


def test_training_from_python_example_configs_load_and_its_results_are_read(monkeypatch):
    """The README's notebook block, from the repository root: its configs load and validate as written and
    what it reads of the results is there. run_sft / run_grpo themselves (which the commands call, and
    tests/test_sft.py and test_grpo.py run) are replaced by ones that return results of the real types."""
    import fxjax.train.grpo as grpo
    import fxjax.train.sft as sft
    from fxjax.train.evaluation import EvalResult

    block = fenced_blocks("python")[2]
    assert "run_sft(load_sft_config(" in block and "run_grpo(load_grpo_config(" in block
    metrics = EvalResult(loss=0.5, format_rate=1.0, verdict_accuracy=0.9, mean_iou=0.7, examples=10).metrics()
    configs = []

    def run(result):
        def fake(cfg, **kwargs):
            configs.append(cfg)
            return result
        return fake

    monkeypatch.setattr(sft, "run_sft", run(sft.SFTResult(steps=1000, total_steps=1000, final_loss=0.1,
                                                           checkpoint_dir="runs/sft/checkpoints",
                                                           exported={"adapter": "runs/sft/adapter"})))
    monkeypatch.setattr(grpo, "run_grpo", run(grpo.GRPOResult(steps=6, total_steps=6, evals=[(2, metrics)],
                                                              history=[{"step": 1, "reward/total_mean": 1.5}],
                                                              model="the model")))
    monkeypatch.chdir(README.parent)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    sft_cfg, grpo_cfg = configs
    assert sft_cfg.model.path == "/models/Qwen2.5-VL-3B-Instruct" and sft_cfg.train.steps == 1000
    assert grpo_cfg.model.from_run == "runs/sft" and grpo_cfg.train.output_dir == "runs/grpo"
    for cfg in configs:
        assert [str(f) for f in cfg.data.train_files] == ["data/train.jsonl"]
        assert [str(f) for f in cfg.data.eval_files] == ["data/test.jsonl"]
    assert scope["rewards_per_step"] == [1.5] and scope["model"] == "the model"


@pytest.mark.parametrize("command", sorted({c[0] for c in fxjax_commands() if not c[0].startswith("-")}))
def test_every_readme_command_exists(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_every_readme_command_line_parses():
    commands = fxjax_commands()
    assert {c[0] for c in commands} >= {"demo", "selfcheck", "sft", "info", "init", "make-demo-data"}
    for words in commands:
        if words[0].startswith("-"):  # an option of fxjax itself (--version): it answers and exits 0
            with pytest.raises(SystemExit) as exit_info:
                build_parser().parse_args(words)
            assert exit_info.value.code == 0, words
            continue
        args = build_parser().parse_args(words)  # an argument error exits (SystemExit) and fails the test
        assert args.command == words[0]


def test_readme_training_commands_pass_config_validation(monkeypatch):
    """Each README `fxjax sft` line, from the repository root as the README assumes: the config file plus
    exactly its --set overrides give a valid SFTConfig (the one missing thing is a real 3B checkpoint)."""
    from fxjax.train_config import load_sft_config

    monkeypatch.chdir(README.parent)
    sft = [words for words in fxjax_commands() if words[0] == "sft"]
    assert any(w == "train.steps=1000" for words in sft for w in words)  # the README's first example
    for words in sft:
        args = build_parser().parse_args(words)
        notes: list[str] = []
        cfg = load_sft_config(args.config, overrides=args.set or [], log=notes.append)
        assert cfg.model.path is not None and cfg.data.train_files
        assert (cfg.train.steps is None) != (cfg.train.epochs is None)


def test_readme_grpo_commands_pass_config_validation(monkeypatch):
    """Each README `fxjax grpo` line gives a valid GRPOConfig from its config file and --set overrides (one
    lacked data.train_files, which configs/grpo.yaml leaves empty, and failed as written)."""
    from fxjax.grpo_config import load_grpo_config

    monkeypatch.chdir(README.parent)
    grpo = [words for words in fxjax_commands() if words[0] == "grpo"]
    assert len(grpo) >= 2
    for words in grpo:
        args = build_parser().parse_args(words)
        cfg = load_grpo_config(args.config, overrides=args.set or [], log=lambda text: None)
        assert cfg.data.train_files, words


def test_import_fxjax_reaches_the_python_api_modules_the_readme_names():
    """`fxjax.evaluate.evaluate`, `fxjax.detector.ImageDetector`, `fxjax.train_config.from_dict` and
    `fxjax.grpo_config.grpo_from_dict` after a bare `import fxjax` (they raised AttributeError)."""
    import fxjax

    assert callable(fxjax.evaluate.evaluate) and callable(fxjax.detector.ImageDetector)
    assert callable(fxjax.train_config.from_dict) and callable(fxjax.grpo_config.grpo_from_dict)
    assert fxjax.init_model is __import__("fxjax.model_init").model_init.init_model  # (a random preset model)
