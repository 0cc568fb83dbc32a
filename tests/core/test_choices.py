"""The choice lists are defined once (lcjax/choices.py) and every table that implements them agrees:
config validation accepts exactly the listed names, and each listed name has an implementation."""

import dataclasses

import numpy as np
import pytest

from lcjax import choices
from lcjax import config as config_lib
from lcjax.kernels.flash_attention import api
from lcjax.model.llama import REMAT_POLICIES
from lcjax.ops import layout, rope
from lcjax.parallel import sequence
from lcjax.plan import comm, flops


def test_implementing_tables_match_the_lists():
    assert tuple(sequence.IMPLEMENTATIONS) == choices.ATTENTION_IMPLS
    assert tuple(api.KERNELS) == choices.KERNELS
    assert ("none", *REMAT_POLICIES) == choices.REMAT_POLICIES
    assert config_lib.LAYOUTS is layout.LAYOUTS is choices.LAYOUTS
    assert config_lib.ROPE_TYPES is rope.ROPE_TYPES is choices.ROPE_TYPES
    # the planner models a subset of them
    assert set(comm.ATTENTION_IMPLS) <= set(choices.ATTENTION_IMPLS)
    assert set(flops.REMAT_POLICIES) <= set(choices.REMAT_POLICIES)


@pytest.mark.parametrize("name", choices.LAYOUTS)
def test_every_layout_permutes(name):
    perm = layout.permutation(16, name, 4)
    assert sorted(perm.tolist()) == list(range(16))
    np.testing.assert_array_equal(layout.unpermute(layout.permute(np.arange(16), name, 4, axis=0), name, 4, axis=0),
                                  np.arange(16))


@pytest.mark.parametrize("name", choices.ROPE_TYPES)
def test_every_rope_type_has_frequencies(name):
    theta, factor = rope.scaled_frequencies(8, base=1e4, type=name, factor=2.0, original_max_position=64)
    assert theta.shape == (4,) and np.all(np.isfinite(theta)) and factor > 0


def test_every_kernel_is_a_module_with_the_contract():
    for name, module in api.KERNELS.items():
        assert callable(module.flash_forward) and callable(module.flash_backward), name
    assert api.get_kernel("pallas") is api.get_kernel("pallas_triton")
    assert api.is_pallas("pallas_triton") and not api.is_pallas("xla") and not api.is_pallas("unknown")


@pytest.mark.parametrize("key, section, field, lst", [
    ("attention.impl", "attention", "impl", choices.ATTENTION_IMPLS),
    ("attention.layout", "attention", "layout", choices.LAYOUTS),
    ("attention.kernel", "attention", "kernel", choices.KERNELS),
    ("attention.dkv_dtype", "attention", "dkv_dtype", choices.DKV_DTYPES),
    ("train.remat", "train", "remat", choices.REMAT_POLICIES),
    ("train.dtype", "train", "dtype", choices.DTYPES)])
def test_config_accepts_exactly_the_list(key, section, field, lst):
    base = config_lib.load(None, ["mesh.sequence=1", "attention.impl=local", "attention.layout=contiguous",
                                  "train.dtype=bfloat16", "data.cross_document_attention=true",  # cudnn's rules
                                  "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2"])  # pallas_mosaic's
    with_value = lambda v: dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section),
                                                                                      **{field: v})})
    for value in lst:
        if key == "attention.impl" and value in ("ulysses", "hybrid"):
            continue  # needs a sequence axis and head counts; the name itself is accepted (test_config)
        config_lib.validate(with_value(value))
    with pytest.raises(ValueError, match=rf"{key} 'nope' must be one of {', '.join(lst)}"):
        config_lib.validate(with_value("nope"))
