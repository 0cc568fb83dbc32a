"""RoPE scaling (lcjax.ops.rope): every variant against its closed form, float64 accuracy far out, layout
invariance, the config rules, and (with the optional torch + transformers) transformers' own definitions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lcjax import config as config_lib
from lcjax.ops import rope
from lcjax.ops.layout import permute

H = 128
VARIANTS = {  # type -> keyword arguments (LLaMA-2- and LLaMA-3-like settings)
    "default": dict(type="default"),
    "linear": dict(type="linear", factor=4.0),
    "ntk": dict(type="ntk", factor=8.0),
    "dynamic": dict(type="dynamic", factor=4.0, original_max_position=2048),
    "yarn": dict(type="yarn", factor=16.0, original_max_position=4096),
    "llama3": dict(type="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0,
                   high_freq_factor=4.0),
}


def test_linear_and_ntk_closed_forms():
    theta = rope.inv_frequencies(H, 1e4)
    inv, m = rope.scaled_frequencies(H, 1e4, type="linear", factor=4.0)
    np.testing.assert_array_equal(inv, theta / 4.0)
    assert m == 1.0
    inv, _ = rope.scaled_frequencies(H, 1e4, type="ntk", factor=8.0)
    new_base = 1e4 * 8.0 ** (H / (H - 2))
    assert new_base == pytest.approx(82684.62, abs=0.01)  # formulas.md §7
    np.testing.assert_allclose(inv, new_base ** (-np.arange(0, H, 2) / H), rtol=1e-15)


def test_dynamic_ntk_is_default_up_to_the_original_length_then_grows():
    theta = rope.inv_frequencies(H, 1e4)
    kw = dict(type="dynamic", factor=4.0, original_max_position=2048)
    np.testing.assert_allclose(rope.scaled_frequencies(H, 1e4, max_position=1000, **kw)[0], theta, rtol=1e-15)
    inv, _ = rope.scaled_frequencies(H, 1e4, max_position=8192, **kw)
    base = 1e4 * (4.0 * 8192 / 2048 - 3.0) ** (H / (H - 2))
    np.testing.assert_allclose(inv, rope.inv_frequencies(H, base), rtol=1e-15)


@pytest.mark.parametrize("length,base,bounds", [(4096, 1e4, (20, 46)), (8192, 5e5, (18, 35))])
def test_yarn_ramp_bounds_and_bands(length, base, bounds):
    assert rope.yarn_correction_range(H, base, length) == bounds  # formulas.md §5
    theta = rope.inv_frequencies(H, base)
    inv, m = rope.scaled_frequencies(H, base, type="yarn", factor=16.0, original_max_position=length)
    low, high = bounds
    np.testing.assert_array_equal(inv[: low + 1], theta[: low + 1])  # fast pairs: extrapolated
    np.testing.assert_allclose(inv[high:], theta[high:] / 16.0, rtol=1e-15)  # slow pairs: interpolated
    i = np.arange(low, high + 1)
    ramp = (i - low) / (high - low)
    np.testing.assert_allclose(inv[low: high + 1], theta[i] * (1 - ramp) + theta[i] / 16 * ramp, rtol=1e-15)
    assert m == pytest.approx(1.277259, abs=1e-6)


def test_yarn_attention_factor():
    assert rope.yarn_attention_factor(32.0) == pytest.approx(1.346574, abs=1e-6)
    assert rope.yarn_attention_factor(1.0) == 1.0
    kw = dict(type="yarn", factor=4.0, original_max_position=64)
    assert rope.scaled_frequencies(16, 1e4, attention_factor=1.5, **kw)[1] == 1.5
    t = rope.rope_tables(10, 16, 1e4, **kw)
    cos, sin = rope.cos_sin(jnp.arange(10, dtype=jnp.int32)[None], t)
    np.testing.assert_allclose(np.asarray(cos) ** 2 + np.asarray(sin) ** 2, (0.1 * math.log(4) + 1) ** 2, rtol=1e-6)


def test_llama31_three_frequency_bands():
    theta = rope.inv_frequencies(H, 5e5)
    inv, _ = rope.scaled_frequencies(H, 5e5, **VARIANTS["llama3"])
    kept, divided = inv == theta, np.isclose(inv, theta / 8, rtol=1e-15)
    middle = ~kept & ~divided
    assert (kept.sum(), middle.sum(), divided.sum()) == (29, 6, 29)  # formulas.md §5
    assert kept[:29].all() and middle[29:35].all() and divided[35:].all()
    wavelength = 2 * np.pi / theta[29:35]
    smooth = (8192 / wavelength - 1) / (4 - 1)
    np.testing.assert_allclose(inv[29:35], (1 - smooth) * theta[29:35] / 8 + smooth * theta[29:35], rtol=1e-15)
    assert np.all(np.diff(inv) < 0)  # still monotone


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cos_sin_match_float64_at_a_million(name):
    kw = VARIANTS[name]
    base = 5e5
    positions = np.array([[0, 1, 4095, 131_071, 524_287, 999_999]], np.int32)
    tables = rope.rope_tables(1_000_000, H, base, **kw)
    cos, sin = rope.cos_sin(jnp.asarray(positions), tables)
    inv, m = rope.scaled_frequencies(H, base, max_position=1_000_000, **kw)
    angle = positions[..., None].astype(np.float64) * inv
    assert np.max(np.abs(np.asarray(cos, np.float64) - m * np.cos(angle))) < 1e-5
    assert np.max(np.abs(np.asarray(sin, np.float64) - m * np.sin(angle))) < 1e-5


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_rope_is_invariant_under_the_layout_permutation(name, layout):
    """Rotating tokens in layout order with their true positions equals permuting the rotated sequence."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 32, 3, 16)), jnp.float32)
    positions = jnp.asarray(np.tile(np.arange(100, 132), (2, 1)), jnp.int32)
    kw = dict(VARIANTS[name], **({"original_max_position": 16} if "original_max_position" in VARIANTS[name] else {}))
    tables = rope.rope_tables(132, 16, 1e4, **kw)
    rotated = rope.apply_rope(x, *rope.cos_sin(positions, tables))
    permuted = rope.apply_rope(permute(x, layout, 4), *rope.cos_sin(permute(positions, layout, 4), tables))
    np.testing.assert_array_equal(np.asarray(permuted), np.asarray(permute(rotated, layout, 4)))


def test_config_reads_rope_keys():
    cfg = config_lib.load(None, ["model.rope.type=yarn", "model.rope.factor=4", "model.rope.base=500000",
                                 "model.rope.original_max_position=8192", "model.rope.beta_fast=16",
                                 "model.rope.beta_slow=2", "model.rope.attention_factor=1.2"])
    r = cfg.model.rope
    assert (r.type, r.factor, r.original_max_position, r.beta_fast, r.beta_slow, r.attention_factor) == \
        ("yarn", 4.0, 8192, 16.0, 2.0, 1.2)
    inv, m = rope.scaled_frequencies(64, **vars(r))
    assert m == 1.2 and inv.shape == (32,)
    r = config_lib.load(None, ["model.rope.type=llama3", "model.rope.factor=8", "model.rope.low_freq_factor=2",
                               "model.rope.high_freq_factor=8", "model.rope.original_max_position=64"]).model.rope
    assert (r.low_freq_factor, r.high_freq_factor) == (2.0, 8.0)


@pytest.mark.parametrize("sets,message", [
    (["model.rope.type=longrope"], "model.rope.type 'longrope' must be one of"),
    (["model.rope.type=linear", "model.rope.factor=0.5"], "model.rope.factor 0.5 must be a finite number >= 1"),
    (["model.rope.type=linear", "model.rope.factor=nan"], "model.rope.factor nan must be"),
    (["model.rope.factor=2"], "model.rope.factor 2.0 needs a scaling model.rope.type"),
    (["model.rope.type=yarn", "model.rope.factor=2"], "model.rope.original_max_position None must be >= 1"),
    (["model.rope.type=llama3", "model.rope.factor=2", "model.rope.original_max_position=0"],
     "model.rope.original_max_position 0 must be >= 1"),
    (["model.rope.type=linear", "model.rope.factor=2", "model.rope.original_max_position=8"],
     "model.rope.original_max_position is only used by"),
    (["model.rope.type=yarn", "model.rope.factor=2", "model.rope.original_max_position=8", "model.rope.beta_fast=1"],
     "model.rope.beta_fast 1.0 must be finite and > model.rope.beta_slow"),
    (["model.rope.type=linear", "model.rope.factor=2", "model.rope.attention_factor=1.1"],
     "model.rope.attention_factor 1.1 must be"),
    (["model.rope.type=llama3", "model.rope.factor=2", "model.rope.original_max_position=8",
      "model.rope.high_freq_factor=1"], "model.rope.high_freq_factor 1.0 must be finite and >"),
])
def test_bad_rope_config_names_key_and_rule(sets, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        config_lib.load(None, sets)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_frequencies_match_transformers(name):
    """transformers computes θ in float32: agreement to float32 rounding (relative 1e-6)."""
    pytest.importorskip("torch", exc_type=ImportError)
    transformers = pytest.importorskip("transformers", exc_type=ImportError)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = VARIANTS[name]
    params = {"rope_type": kw["type"], "rope_theta": 5e5}
    params.update({k: v for k, v in kw.items() if k in ("factor", "low_freq_factor", "high_freq_factor")})
    max_pos = kw.get("original_max_position", 4096)
    if name in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = max_pos
    if name == "ntk":  # transformers has no static NTK type: it is a base change (how lcjax exports it)
        params = {"rope_type": "default", "rope_theta": 5e5 * kw["factor"] ** (H / (H - 2))}
    hf_cfg = transformers.LlamaConfig(hidden_size=H * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                                      rope_parameters=params)
    emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    inv, m = rope.scaled_frequencies(H, 5e5, **kw)
    np.testing.assert_allclose(inv, emb.inv_freq.double().numpy(), rtol=2e-6)
    assert m == pytest.approx(emb.attention_scaling, rel=1e-12)
    if name == "dynamic":  # what transformers switches to for a batch 3x longer than max_position_embeddings
        inv_hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=3 * max_pos)
        inv, _ = rope.scaled_frequencies(H, 5e5, max_position=3 * max_pos, **kw)
        np.testing.assert_allclose(inv, inv_hf.double().numpy(), rtol=2e-6)


@pytest.mark.parametrize("config,last", [("llama3_8b_4m.yaml", 4_194_303), ("llama2_7b_2m_node.yaml", 2_097_151)])
def test_angles_exact_to_the_last_position_of_the_long_configs(config, last):
    """The 4M and 2M configs' RoPE (as the model builds it: tables for data.seq_len positions) matches
    float64 cos/sin to 1e-6 up to the last position; a float32 product pos·θ would be off by far more."""
    from pathlib import Path

    cfg = config_lib.load(Path(__file__).resolve().parents[2] / "configs/experiments" / config)
    r, hd = cfg.model.rope, cfg.model.d_model // cfg.model.n_heads
    assert cfg.data.seq_len == last + 1
    kw = {k: v for k, v in vars(r).items() if k != "base"}
    positions = np.array([[0, 1, 1023, 1024, 65_537, last - 1, last]], np.int32)
    cos, sin = rope.cos_sin(jnp.asarray(positions), rope.rope_tables(cfg.data.seq_len, hd, r.base, **kw))
    inv, m = rope.scaled_frequencies(hd, r.base, max_position=cfg.data.seq_len, **kw)
    angle = positions[..., None].astype(np.float64) * inv
    assert np.max(np.abs(np.asarray(cos, np.float64) - m * np.cos(angle))) < 1e-6
    assert np.max(np.abs(np.asarray(sin, np.float64) - m * np.sin(angle))) < 1e-6
    naive = np.float32(last) * inv.astype(np.float32)  # what the split angle avoids
    assert np.max(np.abs(np.cos(naive.astype(np.float64)) - np.cos(last * inv))) > 1e-3
