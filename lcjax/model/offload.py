"""Remat policies with host offload: where the residuals a layer saves for its backward live.

``jax.checkpoint`` on the scanned layer body saves, per layer, the values its policy names
(lcjax.model.llama.REMAT_POLICIES) and recomputes the rest in the backward. ``offload`` moves saved values
from device memory to pinned host memory instead (JAX's ``Offloadable(src="device", dst="pinned_host")``
policy result, lowered by XLA to asynchronous device-to-host copies after the forward use and
host-to-device copies before the backward use, which XLA's scheduler overlaps with the neighbouring
layers' compute):

- ``none``: every saved value stays on the device;
- ``layer``: the layer inputs (the remat checkpoints between layers, named ``layer_input``) go to the host;
  what the policy saves inside the layer (the ring's out/lse under ``full``) stays on the device;
- ``saved``: every value the policy saves goes to the host (the layer input, and the ring's out/lse, q/k/v
  under the selective policies). ``dots`` keeps its matmul outputs on the device either way.

A deviceless GPU compile accepts these (scripts/offload_repro.py) and reports the host buffers in
``memory_analysis().host_temp_size_in_bytes``. On a CPU backend host and device memory are the same RAM:
XLA's CPU compiler keeps the values where they are (the offload annotations are dropped), so the numbers
are those of ``offload=none`` (tests/model/test_offload.py).

Policies are functions of (primitive, *avals, **params) returning a bool or a ``pe.Saveable`` /
``pe.Recompute`` / ``pe.Offloadable`` (jax.checkpoint_policies).
"""

from __future__ import annotations

import jax

from lcjax.choices import OFFLOAD_MODES  # noqa: E402,F401
LAYER_INPUT = "layer_input"  # checkpoint_name of the scanned layer's input
RING_RESIDUALS = ("attention", "attention_lse")  # the ring's (out, lse), named in lcjax.parallel.ring
SAVED_NAMES = {  # the names each remat policy keeps (besides the layer input, always a residual)
    "layer": (),
    "full": RING_RESIDUALS,
    "attention": (*RING_RESIDUALS, "qkv"),
    "dots": RING_RESIDUALS,
}


def offload_policy(remat: str, offload: str):
    """The ``jax.checkpoint`` policy of remat policy ``remat`` (layer, full, attention, dots) with the
    residuals of ``offload`` (layer or saved) kept in pinned host memory. The layer body must route its
    input through ``checkpoint_name(x, LAYER_INPUT)``. Raises ValueError for unknown names."""
    if remat not in SAVED_NAMES or offload not in OFFLOAD_MODES[1:]:
        raise ValueError(f"offload_policy: remat {remat!r} must be one of {', '.join(SAVED_NAMES)} and offload "
                         f"{offload!r} one of {', '.join(OFFLOAD_MODES[1:])}")
    inside = SAVED_NAMES[remat]
    names = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=inside if offload == "layer" else (),
        names_which_can_be_offloaded=(LAYER_INPUT,) + (() if offload == "layer" else inside),
        offload_src="device", offload_dst="pinned_host")
    if remat != "dots":
        return names
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    def policy(prim, *args, **params):  # matmul outputs saved on the device; names as above (disjoint)
        return True if dots(prim, *args, **params) else names(prim, *args, **params)
    return policy
