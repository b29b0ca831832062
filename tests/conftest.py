"""Shared fixtures: tiny random HF Qwen2.5-VL checkpoints built with torch + save_pretrained (the oracle)."""

from __future__ import annotations

import os
import shutil
import uuid

from launch import COMPILE_ENV, COMPILE_XLA_FLAGS, suite_cache_env  # (imports no jax)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' compile settings (why: tests/launch.py), before JAX's backend starts; the processes the tests
# start get them from launch.subprocess_env.
for _key, _value in COMPILE_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ["FXJAX_COMPILATION_CACHE"] = "off"  # (a command run in this process uses the suite's cache below)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COMPILE_XLA_FLAGS}".strip()
# One persistent XLA cache for this run of the suite (tests/launch.py suite_cache_env): both xdist workers (the
# run's id is theirs: pytest_configure) and every process a test starts read and write it. A fresh folder
# each run, removed at its end: no program carries from one run of the suite to the next.
SUITE_RUN = os.environ.setdefault("PYTEST_XDIST_TESTRUNUID", uuid.uuid4().hex)
os.environ.update(suite_cache_env(SUITE_RUN))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import settings as hypothesis_settings  # noqa: E402

# The property tests draw the same examples every run (a seed per test): a CI run is a verdict on the code,
# not on the draw (box_iou's float32 1.0000001 was found by one CI's draw, none before it)
hypothesis_settings.register_profile("fxjax", derandomize=True)
hypothesis_settings.load_profile("fxjax")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numerics import free_port, rel_err, rms_rel_err  # noqa: E402,F401  (shared by the test modules)

# Non-default token ids inside a small vocab: proves every id comes from the config.
TINY_TOKENS = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)


def tiny_hf_config(*, vocab_size=128, hidden=32, layers=2, heads=4, kv_heads=2, vision_depth=3,
                   vision_hidden=32, vision_heads=2, window_size=56, fullatt=(1,), tie=False,
                   mrope_section=(2, 1, 1)):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=48,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section),
                                          "rope_theta": 1e6},
                         tie_word_embeddings=tie),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=40,
                           num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=list(fullatt),
                           window_size=window_size),
        tie_word_embeddings=tie,
        **TINY_TOKENS,
    )


def build_hf_model(seed: int = 0, **config_overrides):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**config_overrides)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so a mis-mapped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny untied checkpoint (fp32, Hub naming) with its HF model's path."""
    directory = tmp_path_factory.mktemp("tiny")
    return save_hf_model(build_hf_model(), directory)


def image_prompt(grids, rng: np.random.RandomState, *, prefix=(5, 6), between=(7, 8), suffix=(9, 10, 11)):
    """Token ids with each image as <vision_start> <image_pad> * n <vision_end>, plus random pixel rows."""
    ids = list(prefix)
    for i, (t, h, w) in enumerate(grids):
        if i:
            ids += list(between)
        ids += [TINY_TOKENS["vision_start_token_id"]] + [TINY_TOKENS["image_token_id"]] * (t * h * w // 4)
        ids += [TINY_TOKENS["vision_end_token_id"]]
    ids += list(suffix)
    rows = int(sum(t * h * w for t, h, w in grids))
    pixel_values = rng.randn(rows, 3 * 2 * 14 * 14).astype(np.float32)
    return np.array(ids, dtype=np.int64), pixel_values, np.array(grids, dtype=np.int64)


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int = TINY_TOKENS["image_token_id"]) -> np.ndarray:
    """What HF's processor returns (1 at image tokens); transformers 5.x needs it for 3D positions."""
    return (input_ids == image_token_id).astype(np.int64)


# ---- helpers shared by test_parity.py and test_hf_io.py -------------------------------------------

def spread_logits_models(directory: Path, weight_scale: float = 5.0):
    """(HF model, fxjax model) of the tiny checkpoint with its decoder's weights times `weight_scale`: the HF
    random init (std 0.02) gives near-uniform logits (greedy repeats one token, sampling settings barely
    matter); scaled weights spread them, so greedy paths wander and temperature / top-k / top-p each change
    the distribution measurably."""
    import torch

    import fxjax

    hf = build_hf_model(seed=0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith(("model.language_model", "lm_head")):
                p.mul_(weight_scale)
    return hf, fxjax.from_pretrained(save_hf_model(hf, directory))


def load_hf_model(directory, dtype="float32"):
    """The transformers oracle loaded from a saved checkpoint directory (eval mode)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(directory), dtype=getattr(torch, dtype)).eval()


def hf_logits(hf_model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> np.ndarray:
    """HF logits as float32 numpy; passes mm_token_type_ids so transformers 5.x builds 3D M-RoPE positions."""
    import torch

    input_ids = np.asarray(input_ids)
    kwargs = dict(input_ids=torch.as_tensor(input_ids, dtype=torch.long), use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(np.asarray(pixel_values)).to(hf_model.dtype)
        kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
        kwargs["mm_token_type_ids"] = torch.as_tensor(mm_token_type_ids(input_ids, hf_model.config.image_token_id))
    hf_model.model.rope_deltas = None  # HF caches rope deltas between calls; keep each call independent
    with torch.no_grad():
        return hf_model(**kwargs).logits.float().numpy()


@pytest.fixture(scope="session")
def tokenizer_dir(request, tmp_path_factory) -> Path:
    """The offline Qwen2.5-VL tokenizer, built once into pytest's cache (a temporary directory without it)."""
    from fxjax.data.tokenizer import cached_qwen_tokenizer

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("fxjax_data")) if cache is not None else tmp_path_factory.mktemp("fxjax_data")
    return cached_qwen_tokenizer(root)


# The ids of the image tokens in the real Qwen2.5-VL tokenizer (the tokenizer_dir fixture).
QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)


@pytest.fixture(scope="session")
def tiny_vl_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL in HF layout with the real vocabulary and token ids, plus the Qwen2.5-VL
    tokenizer: what the CLI's commands load. Built with torch (a second or two, where initialising fxjax's
    tiny preset compiles for tens of seconds)."""
    import shutil

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_hf_config(vocab_size=151936, tie=True)
    for key, value in QWEN_TOKENS.items():
        setattr(config, key, value)
    config.text_config.bos_token_id = config.text_config.pad_token_id = 151643
    config.text_config.eos_token_id = 151645
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_vl")
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nothing can be written into: mode 0555, or for root (whom modes do not stop) the immutable
    attribute (chattr +i, which stops root too); taken back afterwards so that tmp_path can be removed."""
    import shutil
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("this machine lets the tests write into any folder (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


# The slowest modules (subprocess runs, multi-device workers) first: pytest-xdist (-n 2 --dist loadfile
# --no-loadscope-reorder, in pyproject.toml) hands out whole modules in collection order, so starting with
# the long ones keeps both workers busy to the end instead of leaving one long module running alone.
SLOW_FIRST = ("test_grpo.py", "test_sft.py", "test_sharding.py", "test_traceable.py", "test_losses.py",
              "test_multihost.py", "test_grpo_batch.py", "test_scan_layers.py", "test_export_cli.py",
              "test_layering.py", "test_readme.py", "test_vision_shards.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


def pytest_configure(config):
    if not hasattr(config, "workerinput") and getattr(config.option, "testrunuid", "") is None:
        config.option.testrunuid = SUITE_RUN  # (xdist's workers get this run's id, hence its cache)


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # (the controller, or the one process of -n 0)
        shutil.rmtree(suite_cache_env(SUITE_RUN)["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
