"""The one attention spec: every static attention setting, from the config (``attention.*``) down to the
per-device kernel, in one hashable object that no layer re-packs (docs/design.md, "One attention spec").

The model builds it once (``lcjax.model.llama.attention_spec(cfg)``), the public entry
``lcjax.attention.attention`` builds it from its keyword arguments; the sequence-parallel dispatch
(:mod:`lcjax.parallel.sequence`), Ulysses and the ring pass it on unchanged, and the ring hands its kernel
fields to the kernel chosen by name from ``lcjax.kernels.flash_attention.api.KERNELS``.
"""

from __future__ import annotations

from typing import NamedTuple


class AttentionSpec(NamedTuple):
    """Static attention settings (plain values, hashable: a non-differentiable argument of the ring's
    custom VJP).

    impl: sequence parallelism, one of ``lcjax.choices.ATTENTION_IMPLS``; layout: token order over the
    shards (``lcjax.choices.LAYOUTS``); window: W keys per query including itself (None: unlimited; causal
    only); block_q / block_k: the kernel's tiles in tokens (None: its own tuned tiles); kernel: the
    per-device kernel's name (``lcjax.choices.KERNELS``); dkv_dtype: dtype of the dK/dV accumulators on the
    backward ring's wire (``lcjax.choices.DKV_DTYPES``); ulysses_size: the all-to-all group size of
    ``hybrid`` (None: the whole axis); causal: key position <= query position; scale: score scale (None:
    1/√H); ordered: the caller vouches that within each segment positions grow at least as fast as the
    token index in the original order (the loader's windows do; lcjax.parallel.ring.is_ordered), which lets
    a ring with a window send less — every impl is exact for any positions without it.
    """

    impl: str = "ring"
    layout: str = "zigzag"
    window: int | None = None
    block_q: int | None = None
    block_k: int | None = None
    kernel: str = "xla"
    dkv_dtype: str = "float32"
    ulysses_size: int | None = None
    causal: bool = True
    scale: float | None = None
    ordered: bool = False

    def kernel_options(self) -> dict:
        """The keyword arguments of the kernels' ``flash_forward`` / ``flash_backward`` contract
        (lcjax.kernels.flash_attention.xla): causal, window, scale, block_q, block_k."""
        return {"causal": self.causal, "window": self.window, "scale": self.scale, "block_q": self.block_q,
                "block_k": self.block_k}
