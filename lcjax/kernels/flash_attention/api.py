"""Kernel selection: every per-device flash-attention implementation offers the same two functions.

``flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal, window, scale, block_q, block_k)``
-> (out float32 [B, T, N, H], lse float32 [B, T, N]) and
``flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal, window, scale, block_q,
block_k)`` -> (dq, dk, dv) float32; see :mod:`lcjax.kernels.flash_attention.xla` for the contract.
``block_q = block_k = None`` means the kernel's own tiles (512 for xla, the tuned table for the Triton
kernels); integers override them.
"""

from __future__ import annotations

from lcjax.kernels.flash_attention import cudnn, pallas_mosaic, pallas_triton, xla

# name -> kernel module; its keys are lcjax.choices.KERNELS (tests/core/test_choices.py)
KERNELS = {"xla": xla,
           # "pallas": the best verified Pallas kernel for GPUs; today the Triton-backend kernels
           "pallas": pallas_triton,
           "pallas_triton": pallas_triton,
           "pallas_mosaic": pallas_mosaic,  # opt-in until its GPU parity is verified (docs/kernels.md)
           "cudnn": cudnn}


def is_pallas(name: str) -> bool:
    """Whether kernel ``name`` is a Pallas kernel (its module sets ``PALLAS = True``; a ``shard_map``
    around it needs ``check_vma=False``: Pallas in interpret mode does not track varying manual axes)."""
    return name in KERNELS and getattr(KERNELS[name], "PALLAS", False)


def get_kernel(name: str):
    """The module implementing kernel ``name`` (a key of KERNELS); raises ValueError for another name."""
    if name not in KERNELS:
        raise ValueError(f"attention.kernel {name!r} must be one of {', '.join(KERNELS)}")
    return KERNELS[name]
