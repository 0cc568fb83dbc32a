"""Kernel selection: every per-device flash-attention implementation offers the same two functions.

``flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, window, scale, block_q, block_k)``
-> (out float32 [B, T, N, H], lse float32 [B, T, N]) and
``flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal, window, scale, block_q,
block_k)`` -> (dq, dk, dv) float32; see :mod:`lcjax.kernels.flash_attention.xla` for the contract.
"""

from __future__ import annotations

import importlib

KERNELS = {"xla": "lcjax.kernels.flash_attention.xla",
           "pallas": "lcjax.kernels.flash_attention.pallas_triton"}


def get_kernel(name: str):
    """The module implementing kernel ``name`` ("xla" or "pallas"); raises ValueError for another name."""
    if name not in KERNELS:
        raise ValueError(f"attention.kernel {name!r} must be one of {', '.join(KERNELS)}")
    return importlib.import_module(KERNELS[name])
