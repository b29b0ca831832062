"""grpo.reward_funcs, TRL's reward_funcs for fxjax's GRPO: the config's checks, the import with its errors, the
terms added to the total with the columns each function gets, and their step metrics over processes. (The
GRPO runs of tests/test_grpo.py train with one, tests/grpo_test_rewards.py, through the real CLI.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fxjax.config_mapping import ConfigError
from fxjax.grpo_config import grpo_from_dict
from fxjax.train.reward_funcs import RewardFunc, add_reward_funcs, load_reward_funcs
from fxjax.train.rollout import Rollout, combine_rollout_sums, rollout_sums

BASE = {"model": {"preset": "tiny"}, "data": {"train_files": ["t.jsonl"], "tokenizer": "tok"}}


def config(*funcs):
    return grpo_from_dict({**BASE, "grpo": {"reward_funcs": list(funcs)}})


def functions_of(module: str, *names: str):
    """The reward functions `names` of `module`, each entry named as its function, loaded as a run loads them."""
    return load_reward_funcs(config(*({"name": n, "function": f"{module}:{n}"} for n in names)).grpo.reward_funcs)


@pytest.mark.parametrize("func, message", [
    ({"name": "my term", "function": "m:f"}, r"reward_funcs\[0\]\.name: give a name such as brevity"),
    ({"name": "iou", "function": "m:f"}, r"reward_funcs\[0\]\.name: 'iou' is a reward term of the paper's"),
    ({"name": "w_iou", "function": "m:f"}, r"reward_funcs\[0\]\.name: 'w_iou' is a weight of the paper's reward"),
    ({"name": "brevity", "function": "my_rewards.brevity"}, r"reward_funcs\[0\]\.function: give it as "
                                                             r"\"package.module:function\""),
    ({"name": "brevity", "function": "m:f", "weight": float("nan")}, r"reward_funcs\[0\]\.weight: must be a finite"),
    ({"name": "brevity", "function": "m:f", "wieght": 1}, r"reward_funcs\[0\]\.wieght: unknown key"),
])
def test_the_config_names_a_bad_entry(func, message):
    with pytest.raises(ConfigError, match=message):
        config(func)
    with pytest.raises(ConfigError, match=r"grpo.reward_funcs: each needs a name of its own"):
        config({"name": "a", "function": "m:f"}, {"name": "a", "function": "m:g"})


def test_a_function_that_does_not_import_is_named_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kwargs):\n    return [0.0] * len(completions)\n"
                                            "NOT_A_FUNCTION = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import no_such_package\n")
    (tmp_path / "odd_rewards.py").write_text("def nokw(completions):\n    return [0.0] * len(completions)\n"
                                            "def some(completions, *, label, boxes):\n    return []\n"
                                            "def trl(prompts, completions, **kwargs):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config({"name": "brevity", "function": "my_rewards:brevity", "weight": 0.5})
    (func,) = load_reward_funcs(cfg.grpo.reward_funcs)
    assert (func.name, func.weight, func.spec) == ("brevity", 0.5, "my_rewards:brevity")
    for spec, message in (("nowhere:f", r"reward_funcs\[0\]\.function: cannot import 'nowhere' \(ModuleNotFound"),
                          ("broken_rewards:f", r"cannot import 'broken_rewards' \(ModuleNotFoundError: No module "
                                               r"named 'no_such_package'\)"),
                          ("my_rewards:nope", r"my_rewards has no function 'nope'"),
                          ("my_rewards:NOT_A_FUNCTION", r"my_rewards has no function 'NOT_A_FUNCTION'"),
                          # a signature that cannot take the columns: said now, not after a step's sampling
                          ("odd_rewards:nokw", r"odd_rewards:nokw cannot be called as a reward function is \(got an "
                                               r"unexpected keyword argument 'label'\): define it as def nokw"),
                          ("odd_rewards:some", r"unexpected keyword argument 'captions'"),
                          # TRL's signature: its prompts come first, and fxjax has none to give
                          ("odd_rewards:trl", r"odd_rewards:trl cannot be called as a reward function is \(it takes "
                                              r"TRL's `prompts` \(without a default\); fxjax gives none")):
        with pytest.raises(ConfigError, match=message):
            load_reward_funcs(config({"name": "x", "function": spec}).grpo.reward_funcs)


def test_a_module_in_the_working_folder_imports_as_python_there_would_find_it(tmp_path, monkeypatch):
    """The README's my_rewards.py beside the user's config, `fxjax grpo` run in that folder: "No module named
    'my_rewards'" (the fxjax command's sys.path lacks the working folder) unless PYTHONPATH=. was set."""
    import sys

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "cwd_rewards.py").write_text("def brevity(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    (func,) = load_reward_funcs(config({"name": "b", "function": "cwd_rewards:brevity"}).grpo.reward_funcs)
    assert func.function(["a"]) == [0.0] and sys.path[-1] == str(folder)  # (last: it shadows no installed package)
    with pytest.raises(ConfigError, match=r"cannot import 'nowhere_rewards' \(ModuleNotFoundError: .*\); it must be "
                                          r"importable where the run runs: a module in the working folder \("):
        load_reward_funcs(config({"name": "x", "function": "nowhere_rewards:f"}).grpo.reward_funcs)


TARGETS = [{"label": "generated", "boxes": np.array([[1.0, 2.0, 3.0, 4.0]])}, {"label": "real", "boxes": np.zeros((0, 4))}]
METAS = [{"source": "t.jsonl:1", "captions": ("warped fingers",), "tags": ("texture quality",)},
         {"source": "t.jsonl:2", "captions": (), "tags": ()}]
TEXTS = ["a", "bbb", "cc", "dddd"]  # prompt 0's G 2 completions, then prompt 1's


def test_the_terms_are_added_to_the_total_with_each_completions_columns():
    seen = {}

    def brevity(completions, *, label, boxes, captions, tags, record):
        seen.update(completions=completions, label=label, boxes=boxes, captions=captions, tags=tags, record=record)
        return [-len(c) for c in completions]

    scores = {"total": np.array([1.0, 2.0, 3.0, 4.0]), "format": np.ones(4)}
    import jax.numpy as jnp  # (a jax array of numbers is numbers, as a numpy one or a list)

    funcs = [RewardFunc("brevity", brevity, 0.5, "m:brevity"), RewardFunc("one", lambda c, **k: jnp.ones(len(c)), -2, "m:one")]
    out = add_reward_funcs(scores, funcs, TEXTS, TARGETS, METAS, 2)
    np.testing.assert_allclose(out["total"], [1 - 0.5 - 2, 2 - 1.5 - 2, 3 - 1 - 2, 4 - 2 - 2])
    np.testing.assert_array_equal(out["brevity"], [-1, -3, -2, -4])
    np.testing.assert_array_equal(scores["total"], [1, 2, 3, 4])  # (the input left as it was)
    assert seen["completions"] == TEXTS and seen["label"] == ["generated", "generated", "real", "real"]
    assert seen["record"] == ["t.jsonl:1", "t.jsonl:1", "t.jsonl:2", "t.jsonl:2"]
    assert [b.shape for b in seen["boxes"]] == [(1, 4), (1, 4), (0, 4), (0, 4)]
    assert seen["captions"] == [["warped fingers"]] * 2 + [[]] * 2
    assert seen["tags"] == [["texture quality"]] * 2 + [[]] * 2
    for bad, message in ((lambda c, **k: [1.0] * 3, r"brevity \(m:brevity\) returned 3 values for 4 completions"),
                         (lambda c, **k: [[1.0]] * 4, r"returned an array of shape \(4, 1\) for 4 completions"),
                         (lambda c, **k: [0.0, None, 0, 0], r"returned None for completion 1 \(of t.jsonl:1\): give a "
                                                            r"number \(TRL's None, for a completion the term does not "
                                                            r"apply to: give 0 here\)"),
                         (lambda c, **k: ["0", "1", "0", "1"], r"returned '0' for completion 0 \(of t.jsonl:1\): give a number"),
                         (lambda c, **k: [True] * 4, r"returned True for completion 0"),
                         (lambda c, **k: (len(x) for x in c), r"returned a generator: give a list of 4 numbers"),
                         (lambda c, **k: exit(0), r"brevity \(m:brevity\) failed on 4 completions: SystemExit"),
                         (lambda c, **k: [0.0, float("nan"), 0, 0], r"returned nan for completion 1 \(of t.jsonl:1\)"),
                         (lambda c, **k: 1 / 0, r"brevity \(m:brevity\) failed on 4 completions: ZeroDivisionError"),
                         # a function written for TRL's conversational data: the completion is the text here
                         (lambda c, **k: [len(x[0]["content"]) for x in c],
                          r"failed on 4 completions: TypeError: string indices must be integers.* \(each completion is "
                          r"a str here, the decoded text, not TRL's list of messages: c, not c\[0\]\['content'\]\)$")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            add_reward_funcs(scores, [RewardFunc("brevity", bad, 1.0, "m:brevity")], TEXTS, TARGETS, METAS, 2)


def test_a_function_that_takes_the_step_or_stage_gets_them_and_one_that_does_not_still_works(tmp_path, monkeypatch):
    """Reward shaping over the run (TRL's trainer_state): `step` and `stage` go to a function that names them or
    takes **kwargs; one written with the columns alone keeps working (it is not given them)."""
    (tmp_path / "shaped_rewards.py").write_text(
        "SEEN = []\n"
        "def by_stage(completions, *, label, boxes, captions, tags, record, stage):\n"
        "    SEEN.append(('by_stage', stage))\n"
        "    return [{'alpha': 0.0, 'gamma': 1.0}[stage]] * len(completions)\n"
        "def anything(completions, **kwargs):\n"
        "    SEEN.append(('anything', kwargs['step'], kwargs['stage']))\n"
        "    return [0.0] * len(completions)\n"
        "def columns_only(completions, *, label, boxes, captions, tags, record):\n"
        "    SEEN.append(('columns_only',))\n"
        "    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import shaped_rewards

    funcs = functions_of("shaped_rewards", "by_stage", "anything", "columns_only")
    assert [f.progress for f in funcs] == [("stage",), ("step", "stage"), ()]
    scores = {"total": np.zeros(4)}
    alpha = add_reward_funcs(scores, funcs, TEXTS, TARGETS, METAS, 2, progress={"step": 3, "stage": "alpha"})
    gamma = add_reward_funcs(scores, funcs, TEXTS, TARGETS, METAS, 2, progress={"step": 21, "stage": "gamma"})
    np.testing.assert_array_equal(alpha["total"], np.zeros(4))
    np.testing.assert_array_equal(gamma["total"], np.ones(4))
    assert shaped_rewards.SEEN == [("by_stage", "alpha"), ("anything", 3, "alpha"), ("columns_only",),
                                   ("by_stage", "gamma"), ("anything", 21, "gamma"), ("columns_only",)]


def test_trl_signatures_get_the_completions_and_their_token_ids_by_name(tmp_path, monkeypatch):
    """TRL passes prompts=, completions=, completion_ids= by name: a function whose first parameter is not the
    completions got the texts there (a token-length penalty on completion_ids counted characters) or None
    for them (prompts=None first); now the completions go by name to a function that names them, and
    completion_ids (token ids through EOS) to one that takes them. An async function is refused at load (it
    returned a coroutine, said only after a step's sampling)."""
    (tmp_path / "trl_rewards.py").write_text(
        "def token_len(completion_ids, **kwargs):\n    return [-len(ids) for ids in completion_ids]\n"
        "def prompts_default(prompts=None, completions=None, **kwargs):\n    return [len(c) for c in completions]\n"
        "async def later(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = load_reward_funcs(config({"name": "tokens", "function": "trl_rewards:token_len"},
                                     {"name": "chars", "function": "trl_rewards:prompts_default"}).grpo.reward_funcs)
    assert [(f.by_name, f.trl) for f in funcs] == [(True, ("completion_ids",))] * 2
    ids = [np.array([5, 6]), np.array([7, 8, 9, 10]), np.array([11]), np.array([12, 13, 14])]
    out = add_reward_funcs({"total": np.zeros(4)}, funcs, TEXTS, TARGETS, METAS, 2, completion_ids=ids)
    np.testing.assert_array_equal(out["tokens"], [-2, -4, -1, -3])  # (the texts' lengths are 1, 3, 2, 4)
    np.testing.assert_array_equal(out["chars"], [1, 3, 2, 4])
    with pytest.raises(ConfigError, match=r"trl_rewards:later is an async function; fxjax calls reward functions as "
                                          r"plain functions"):
        load_reward_funcs(config({"name": "x", "function": "trl_rewards:later"}).grpo.reward_funcs)


def test_a_terms_step_metrics_combine_over_processes_as_over_the_batch():
    def rollout(rows, values):
        n = len(rows)
        scores = {k: np.asarray(rows, np.float64) for k in ("total", "format", "label", "iou", "iou_relaxed")}
        scores["brevity"] = np.asarray(values, np.float64)
        return Rollout(np.zeros((n, 3), np.int32), np.ones((n, 3), np.int32), np.ones((n, 3), np.float32),
                       np.zeros(n, bool), ["x"] * n, scores, np.zeros(n, np.float32), TARGETS[: n // 2])

    whole = combine_rollout_sums([rollout_sums(rollout([1, 2, 3, 4], [-1, -3, -2, -8]), 2)])
    parts = combine_rollout_sums([rollout_sums(rollout([1, 2], [-1, -3]), 2), rollout_sums(rollout([3, 4], [-2, -8]), 2)])
    assert whole["reward/brevity_mean"] == pytest.approx(-3.5)
    assert whole["reward/brevity_std"] == pytest.approx(np.std([-1, -3, -2, -8], ddof=1))
    for key in ("reward/brevity_mean", "reward/brevity_std", "reward/total_mean"):
        assert parts[key] == pytest.approx(whole[key]), key


def test_the_records_other_keys_are_given_as_trl_gives_a_datasets_columns(tmp_path, monkeypatch):
    """TRL passes every dataset column to a reward function (accuracy_reward(completions, solution, **kwargs)):
    a key a function names, or every key with **kwargs, each completion's record's value (None where its
    record lacks it); fxjax's own names win over a record key of the same name; a named key no record has,
    without a default, is refused at the start naming the keys there are."""
    from types import SimpleNamespace

    from fxjax.train.reward_funcs import attach_record_columns

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"image": "a.png", "label": "generated", "solution": "hand", "difficulty": 2,
                                "meta": {"camera": "phone"},
                                "prompt": "TRL's prompt column: never passed"}) + "\n"
                    + json.dumps({"image": "b.png", "label": "real", "record": "shadowed"}) + "\n")
    (tmp_path / "column_rewards.py").write_text(
        "def accuracy(completions, solution, **kwargs):\n"
        "    return [float(s is not None and s in c) for c, s in zip(completions, solution)]\n"
        "def seen(completions, label, record, **kwargs):\n"
        "    seen.calls.append(dict(kwargs, label=label, record=record))\n"
        "    return [0.0] * len(completions)\n"
        "seen.calls = []\n"
        "def named(completions, *, difficulty, label, boxes, captions, tags, record, hint='none'):\n"
        "    return [float(d or 0) for d in difficulty]\n"
        "def wants(completions, *, answer, **kwargs):\n"
        "    return []\n"
        "def positional(c, /, solution, **kwargs):\n"
        "    assert kwargs['meta'][0] == {'camera': 'phone'}, kwargs['meta']\n"
        "    kwargs['meta'][0]['camera'] = 'changed'  # (its own values: the next call reads the line again)\n"
        "    return [float(s is None) for s in solution]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = functions_of("column_rewards", "accuracy", "seen", "named")
    records = [SimpleNamespace(source=f"{data}:1"), SimpleNamespace(source=f"{data}:2")]
    funcs = attach_record_columns(funcs, records)
    assert [f.columns for f in funcs] == [("difficulty", "image", "meta", "solution")] * 2 + [("difficulty",)]
    metas = [dict(m, source=f"{data}:{i + 1}") for i, m in enumerate(METAS)]
    out = add_reward_funcs({"total": np.zeros(4)}, funcs, ["a hand", "no", "hand", "x"], TARGETS, metas, 2)
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 0, 0])  # record 2 has no solution: None
    np.testing.assert_array_equal(out["named"], [2, 2, 0, 0])
    import column_rewards

    (call,) = column_rewards.seen.calls
    assert call["solution"] == ["hand", "hand", None, None] and call["image"] == ["a.png", "a.png", "b.png", "b.png"]
    assert call["record"] == [f"{data}:1"] * 2 + [f"{data}:2"] * 2  # (fxjax's record, not the record's key)
    assert call["label"] == ["generated", "generated", "real", "real"]
    (positional,) = attach_record_columns(functions_of("column_rewards", "positional"), records)
    for _ in range(2):
        out = add_reward_funcs({"total": np.zeros(4)}, [positional], TEXTS, TARGETS, metas, 2)
        np.testing.assert_array_equal(out["positional"], [0, 0, 1, 1])
    assert column_rewards.seen.calls[0]["image"][0] == "a.png" and len(column_rewards.seen.calls) == 1
    (wants,) = functions_of("column_rewards", "wants")
    with pytest.raises(ConfigError, match=r"grpo.reward_funcs\[0\]\.function: column_rewards:wants takes 'answer', "
                                          r"which no training record has \(their other keys: difficulty, image, "
                                          r"meta, solution\)"):
        attach_record_columns([wants], records)
    # a function that takes no column reads no file
    plain = functions_of("column_rewards", "named")
    assert attach_record_columns([RewardFunc("b", lambda c, *, label, boxes, captions, tags, record: [], 1.0, "m:b")],
                                 [SimpleNamespace(source="/nowhere.jsonl:1")])[0].columns == ()
    assert plain[0].named == ("difficulty", "hint")
