"""fxjax.train.grpo_loss against TRL 1.16's own GRPOTrainer code, run on the same tensors.

The loss: ``GRPOTrainer._compute_loss`` is called unbound on a stand-in ``self`` (a SimpleNamespace with
exactly the attributes it reads, so a new attribute in TRL fails loudly) whose
``_get_per_token_logps_and_entropies`` returns a torch leaf; its ``.grad`` is TRL's gradient.
The advantages: the lines of ``GRPOTrainer._generate_and_score_completions`` from
``unscorable_mask = ...`` to ``advantages = torch.nan_to_num(...)`` are cut out of the installed source
with inspect and executed as they stand (that method also generates and scores, so it cannot run whole).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo
from trl.trainer.utils import nanstd

from fxjax.train.grpo_loss import LOSS_TYPES, group_advantages, grpo_loss

GRPOTrainer = trl_grpo.GRPOTrainer
RTOL, ATOL = 1e-5, 1e-7

EPS_LOW, EPS_HIGH = 0.2, 0.28
DELTA = 1.2  # below 1 + EPS_HIGH, so the cap bites on the ratios drawn below
BETA = 0.04
MAX_LEN = 8
GA, SPG = 2, 4  # gradient accumulation steps, steps_per_generation: both normalisations are exercised
NUM_ITEMS_IN_BATCH = 97.0  # TRL's gathered token count of the generation batch (any value > local works)


# ----------------------------------------------------------------------------------------------- TRL side


class _OneProcess:
    """accelerate's Accelerator as _compute_loss uses it, for one of ``num_processes`` processes."""

    def __init__(self, num_processes=1):
        self.num_processes = num_processes

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x


def trl_loss(logps, old, ref, adv, mask, *, loss_type, delta, beta, level, num_processes=1,
             num_items_in_batch=NUM_ITEMS_IN_BATCH, bias_kl=True):
    """(loss, d loss / d logps, metrics) from TRL's GRPOTrainer._compute_loss."""
    leaf = torch.tensor(logps, requires_grad=True)
    b, t = logps.shape
    entropies = torch.ones(b, t)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (leaf, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=GA,
        max_completion_length=MAX_LEN, accelerator=_OneProcess(num_processes), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl, steps_per_generation=SPG,
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": torch.tensor(mask, dtype=torch.long),
        "advantages": torch.tensor(adv), "num_items_in_batch": torch.tensor(num_items_in_batch),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    if beta != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(ref)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    metrics = {key: values[-1] for key, values in stub._metrics["train"].items() if key != "entropy"}
    return loss.item(), leaf.grad.numpy(), metrics


@functools.cache
def _trl_advantage_block():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    first = "        unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)"
    last = "advantages = torch.nan_to_num(advantages, nan=0.0)"
    assert first in source and last in source, "TRL's advantage lines moved; re-read _generate_and_score_completions"
    block = source[source.index(first):source.index(last) + len(last)]
    return compile(textwrap.dedent(block), "trl/trainer/grpo_trainer.py:_generate_and_score_completions", "exec")


def trl_advantages(rewards, num_generations, scale_rewards):
    """TRL's own advantage lines (sum_then_normalize, one reward function of weight 1)."""
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # GRPOConfig.__post_init__
    scope = {
        "self": SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards,
                                reward_weights=torch.ones(1), reward_funcs=[None]),
        "rewards_per_func": torch.tensor(np.asarray(rewards, np.float32))[:, None],
        "num_generations": num_generations, "device": "cpu", "torch": torch, "nanstd": nanstd,
    }
    exec(_trl_advantage_block(), scope)
    return scope["advantages"].numpy()


# ---------------------------------------------------------------------------------------------- the data


def make_batch(seed=0, rows=8, length=MAX_LEN, truncated_row=3):
    rng = np.random.default_rng(seed)
    logps = (-3.0 * rng.random((rows, length))).astype(np.float32)
    old = (logps + 0.5 * rng.standard_normal((rows, length))).astype(np.float32)
    ref = (logps + 0.3 * rng.standard_normal((rows, length))).astype(np.float32)
    lengths = rng.integers(2, length + 1, rows)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    mask[truncated_row] = 0  # mask_truncated_completions: the caller zeroes the row
    rewards = rng.choice([0.0, 0.5, 1.0, 1.75, 2.0], rows).astype(np.float32)
    adv = np.asarray(group_advantages(rewards, 4, "group"))
    return logps, old, ref, adv, mask


CASES = list(itertools.product((None, DELTA), (0.0, BETA), (False, True)))  # delta, beta, old given


def fxjax_case(loss_type, level, delta, beta, with_old, logps, old, ref, adv, mask, bias_kl=True):
    """((loss, metrics), d loss / d logps) from grpo_loss, the test's constants filled in."""

    def loss_fn(lp):
        return grpo_loss(lp, old if with_old else None, ref if beta else None, adv, mask,
                         loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, delta=delta, beta=beta,
                         use_bias_correction_kl=bias_kl,
                         importance_sampling_level=level, max_completion_length=MAX_LEN,
                         # dapo/cispo: TRL divides by num_items_in_batch / num_processes * GA / steps_per_generation
                         num_items=NUM_ITEMS_IN_BATCH * GA / SPG, gradient_accumulation_steps=GA)

    return jax.value_and_grad(loss_fn, has_aux=True)(logps)


def assert_close(name, ours, theirs, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------- the loss


def check_against_trl(what, ours, theirs):
    (loss, metrics), grad = ours
    t_loss, t_grad, t_metrics = theirs
    assert_close(f"loss {what}", loss, t_loss)
    assert_close(f"grad {what}", grad, t_grad)
    assert np.all(np.asarray(grad)[3] == 0), f"the zero-mask row got a gradient: {what}"
    assert set(metrics) == set(t_metrics), what
    for key in metrics:
        assert_close(f"{key} {what}", metrics[key], t_metrics[key])
    assert np.abs(t_grad).sum() > 0, f"vacuous case, TRL's gradient is zero: {what}"


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_value_gradient_and_metrics_equal_trl(loss_type, level):
    # Op by op, not jitted: the primitives compile once for all 112 cases, where 14 jitted graphs would cost
    # ~3x the CPU (the suite shares 2 cores). test_jitted_loss_equals_trl covers jit.
    batch = make_batch()
    logps, old, ref, adv, mask = batch
    clipped_somewhere = False
    for delta, beta, with_old in CASES:
        what = f"{loss_type}/{level} delta={delta} beta={beta} old={'given' if with_old else 'None'}"
        ours = fxjax_case(loss_type, level, delta, beta, with_old, *batch)
        theirs = trl_loss(logps, old if with_old else None, ref, adv, mask,
                          loss_type=loss_type, delta=delta, beta=beta, level=level)
        check_against_trl(what, ours, theirs)
        metrics = ours[0][1]
        clipped_somewhere |= float(metrics.get("clip_ratio/region_mean", metrics.get("cispo_clip_ratio", 1))) > 0
    assert clipped_somewhere or loss_type == "sapo", "no case clipped anything: the data test nothing"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_plain_k3_kl_equals_trl_without_bias_correction(level):
    """grpo.use_bias_correction_kl: false (the paper's plain k3) against TRL with the same setting, with and
    without stored old log-probs; the setting changes the loss or its gradient (the test would see a no-op)."""
    batch = make_batch(seed=4)
    logps, old, ref, adv, mask = batch
    for with_old in (False, True):
        what = f"plain k3 {level} old={'given' if with_old else 'None'}"
        ours = fxjax_case("grpo", level, None, BETA, with_old, *batch, bias_kl=False)
        theirs = trl_loss(logps, old if with_old else None, ref, adv, mask, loss_type="grpo", delta=None,
                          beta=BETA, level=level, bias_kl=False)
        check_against_trl(what, ours, theirs)
        corrected = fxjax_case("grpo", level, None, BETA, with_old, *batch)
        assert not np.allclose(np.asarray(ours[1]), np.asarray(corrected[1]), rtol=1e-4, atol=1e-7), what


JIT_CASES = [(loss_type, "token") for loss_type in LOSS_TYPES] + [("grpo", "sequence")]


def test_jitted_loss_equals_trl():
    """Under jit (one compilation for all the cases), with delta, beta > 0 and old log-probs given."""
    batch = make_batch(seed=3)
    logps, old, ref, adv, mask = batch
    run = jax.jit(lambda *b: [fxjax_case(lt, lvl, DELTA, BETA, True, *b) for lt, lvl in JIT_CASES])
    for (loss_type, level), ours in zip(JIT_CASES, run(*batch)):
        theirs = trl_loss(logps, old, ref, adv, mask, loss_type=loss_type, delta=DELTA, beta=BETA, level=level)
        check_against_trl(f"jit {loss_type}/{level}", ours, theirs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_global_batch_equals_trl_averaged_over_two_processes(loss_type):
    """The num_items contract: one global-batch call == TRL on each process's half, DDP-averaged."""
    logps, old, ref, adv, mask = make_batch(seed=1)
    losses, grads = [], []
    for half in (slice(0, 4), slice(4, 8)):  # each process keeps whole groups of G = 4
        t_loss, t_grad, _ = trl_loss(logps[half], old[half], ref[half], adv[half], mask[half],
                                     loss_type=loss_type, delta=None, beta=BETA, level="token", num_processes=2)
        losses.append(t_loss)
        grads.append(t_grad)
    ddp_loss, ddp_grad = np.mean(losses), np.concatenate(grads) / 2  # DDP averages gradients over processes

    def loss_fn(lp):
        return grpo_loss(lp, old, ref, adv, mask, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                         beta=BETA, max_completion_length=MAX_LEN, num_items=NUM_ITEMS_IN_BATCH * GA / SPG,
                         gradient_accumulation_steps=GA)[0]

    loss, grad = jax.value_and_grad(loss_fn)(logps)  # op by op: the primitives are compiled already
    assert_close("loss", loss, ddp_loss)
    assert_close("grad", grad, ddp_grad)


def test_truncated_row_garbage_is_never_read():
    """A zero-mask row (mask_truncated_completions) adds nothing, whatever its log-probs hold."""
    logps, old, ref, adv, mask = make_batch(seed=2)
    dirty = [x.copy() for x in (logps, old, ref)]
    for x, value in zip(dirty, (np.nan, np.inf, -np.inf)):
        x[3] = value
        x[mask == 0] = value

    def run(lp, o, r):
        def loss_fn(p):
            return grpo_loss(p, o, r, adv, mask, loss_type="dapo", epsilon_high=EPS_HIGH, beta=BETA,
                             importance_sampling_level="sequence", num_items=float(mask.sum()))
        return jax.value_and_grad(loss_fn, has_aux=True)(lp)

    run = jax.jit(run)
    (clean_loss, clean_metrics), clean_grad = run(logps, old, ref)
    (loss, metrics), grad = run(*dirty)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    assert float(loss) == float(clean_loss)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad))
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    for key in clean_metrics:
        assert float(metrics[key]) == float(clean_metrics[key]), key


def test_bad_options_are_named():
    logps, old, ref, adv, mask = make_batch()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="vespo")
    with pytest.raises(ValueError, match="num_items"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, loss_type="grpo", beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="grpo", importance_sampling_level="seq")


# ---------------------------------------------------------------------------------------------- advantages

REWARDS = {
    "mixed": ([0.0, 1.0, 0.5, 2.0, 1.0, 1.0, 0.25, 3.0], 4),
    "equal_group": ([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.75, 1.0], 4),
    "all_equal": ([1.0] * 6, 3),
    "pairs": ([0.0, 1.0, 2.0, 2.0, 0.5, 1.5], 2),
    "one_per_prompt": ([0.0, 1.0, 2.0], 1),
    "single": ([1.5], 1),
    "unscorable": ([0.0, np.nan, 1.0, 0.5, np.nan, np.nan, np.nan, np.nan], 4),
}


# G = 3, each group equal; torch's float32 mean of three 0.8132702 is one ulp off 0.8132702.
ROUNDING = np.asarray([0.8132702] * 3 + [0.25] * 3 + [0.1] * 3, np.float32)
MODES = ("group", "batch", "none")


@functools.cache
def all_advantages():
    """Every REWARDS case (and ROUNDING) under every mode from ONE jitted graph: one compilation, not 24."""
    inputs = {case: np.asarray(rewards, np.float32) for case, (rewards, _) in REWARDS.items()}
    inputs["rounding"] = ROUNDING
    sizes = {case: g for case, (_, g) in REWARDS.items()} | {"rounding": 3}
    run = jax.jit(lambda x: {(case, mode): group_advantages(x[case], sizes[case], mode)
                             for case in x for mode in MODES})
    return {key: np.asarray(value) for key, value in run(inputs).items()}


@pytest.mark.parametrize("scale_rewards", [*MODES, True, False])
@pytest.mark.parametrize("case", sorted(REWARDS))
def test_group_advantages_equal_trl(case, scale_rewards):
    rewards, g = REWARDS[case]
    rewards = np.asarray(rewards, np.float32)
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    ours = all_advantages()[case, mode]
    theirs = trl_advantages(rewards, g, scale_rewards)
    assert ours.dtype == np.float32 and np.all(np.isfinite(ours))
    assert_close(f"{case} {scale_rewards}", ours, theirs, atol=1e-6)
    if isinstance(scale_rewards, bool):  # GRPOConfig's bool spelling must trace to the same computation
        def trace(spelling):
            fn = functools.partial(group_advantages, num_generations=g, scale_rewards=spelling)
            return str(jax.make_jaxpr(fn)(rewards))
        assert trace(scale_rewards) == trace(mode)
    equal = np.ptp(np.nan_to_num(rewards).reshape(-1, g), axis=1).repeat(g) == 0
    assert np.all(ours[equal] == 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_equal_rewards_give_exactly_zero_even_where_the_mean_rounds(mode):
    # TRL's r - mean leaves the one-ulp residue (6e-4 after dividing by the residue's own std + 1e-4);
    # fxjax gives the exact 0 the method intends.
    assert np.all(all_advantages()["rounding", mode] == 0.0)
    theirs = trl_advantages(ROUNDING, 3, mode)
    assert np.all(np.abs(theirs) < 1e-3) and np.any(theirs[:3] != 0), theirs


def test_group_advantages_rejects_split_groups():
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(np.zeros(6, np.float32), 4, "group")
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(np.zeros(4, np.float32), 2, "global")


def test_every_loss_type_the_loss_computes_is_a_config_value():
    """grpo_config listed four loss types (and a LOSS_TYPES nothing read) while grpo_loss computes seven,
    tested against TRL: luspo, cispo and sapo were reachable from tests only. The config now takes exactly the
    loss's, and sapo's temperatures reach the loss."""
    import typing

    from fxjax.grpo_config import GRPOSection
    from fxjax.train.grpo import loss_options
    from fxjax.train.grpo_loss import LOSS_TYPES

    assert typing.get_args(typing.get_type_hints(GRPOSection)["loss_type"]) == LOSS_TYPES
    opts = loss_options(GRPOSection(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0))
    assert (opts.loss_type, opts.sapo_temperature_pos, opts.sapo_temperature_neg) == ("sapo", 0.5, 2.0)
    from fxjax.config_mapping import ConfigError

    with pytest.raises(ConfigError, match=r"grpo.sapo_temperature_neg: must be a positive number, got 0"):
        GRPOSection(sapo_temperature_neg=0).validate("grpo")
