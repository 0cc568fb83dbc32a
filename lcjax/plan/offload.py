"""Host offload of the remat residuals (``train.offload``): host bytes, device bytes saved, and whether the
PCIe transfers hide under the layers' compute.

What moves (lcjax.model.offload): ``layer`` the layer input, [B/dp, T/sp, D] in the compute dtype;
``saved`` also what the remat policy keeps inside the layer: under ``full`` the ring's output
[tokens, N/tp·H] (compute dtype) and float32 lse [tokens, N/tp]. Per layer and device these bytes go
device → host once in the forward and host → device once in the backward.

Timing model (an estimate): in the forward the copy of layer ℓ's residuals runs while layer ℓ+1
computes; in the backward layer ℓ−1's residuals come back while layer ℓ's backward runs (XLA's
scheduler issues the host-to-device copy one layer ahead). A transfer is hidden when its seconds at the
device's host-link bandwidth (``Device.host_bw``, per direction) do not exceed the forward seconds of one
layer (the shorter of the two windows; the backward is ≥ 2× the forward). Layer forward seconds:
(2·N_layer + attention forward FLOPs per token) · tokens / tp / (peak · efficiency) (lcjax.plan.flops).
Device bytes: the offloaded bytes of every layer leave the device, two layers' worth come back as the
copy buffers (one in flight, one in use).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lcjax.plan import flops
from lcjax.plan.shapes import Shape, layer_params, local_heads

OFFLOAD_MODES = ("none", "layer", "saved")  # lcjax.config.OFFLOAD_MODES
BUFFERS = 2  # layers' worth of offloaded bytes kept on the device as copy buffers


@dataclass(frozen=True)
class OffloadPlan:
    """Per device: bytes moved per layer (each way), host bytes of the whole stack, device bytes freed
    (net of the copy buffers), the seconds of one layer's transfer and of its forward and backward
    compute, and whether the transfer is hidden."""

    bytes_per_layer: int
    host_bytes: int
    device_bytes_saved: int
    transfer_s_per_layer: float
    layer_forward_s: float
    layer_backward_s: float

    @property
    def hidden(self) -> bool:
        return self.transfer_s_per_layer <= self.layer_forward_s

    def as_dict(self) -> dict:
        return {**asdict(self), "hidden": self.hidden}


def offloaded_bytes_per_layer(s: Shape, tokens: int, tp: int, remat: str, offload: str, stored: int) -> int:
    """Bytes one layer sends to the host on one device (module doc); 0 for ``none``. Raises ValueError for
    an unknown ``offload`` or ``remat``."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload {offload!r} must be one of {', '.join(OFFLOAD_MODES)}")
    if remat not in flops.REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} must be one of {', '.join(flops.REMAT_POLICIES)}")
    if offload == "none" or remat == "none":
        return 0
    moved = tokens * s.D * stored
    if offload == "saved" and remat == "full":
        n_loc, _ = local_heads(s, tp)
        moved += tokens * (n_loc * s.H * stored + n_loc * 4)
    return moved


def layer_seconds(s: Shape, seq_len: int, tokens: int, tp: int, rate: float) -> tuple[float, float]:
    """(forward, backward) compute seconds of one layer on one device at ``rate`` FLOP/s: matmuls
    2·N_layer per token, attention forward 2·n_h·d_h·T per token; backward 2× the matmuls and 2.5× the
    attention (FlashAttention-2, arXiv:2307.08691 §4)."""
    matmul = 2 * layer_params(s)  # per token
    attn = flops.attention_forward_flops_per_token(s, seq_len)
    per = tokens / tp / rate
    return (matmul + attn) * per, (2 * matmul + 2.5 * attn) * per


def plan_offload(s: Shape, seq_len: int, tokens: int, tp: int, remat: str, offload: str, stored: int,
                 rate: float, host_bw: float) -> OffloadPlan:
    """The :class:`OffloadPlan` of one device (``rate``: reachable FLOP/s; ``host_bw``: bytes/s per
    direction of the device's host link)."""
    per_layer = offloaded_bytes_per_layer(s, tokens, tp, remat, offload, stored)
    fwd, bwd = layer_seconds(s, seq_len, tokens, tp, rate)
    saved = (s.L - BUFFERS) * per_layer if per_layer else 0
    return OffloadPlan(per_layer, s.L * per_layer, max(saved, 0), per_layer / host_bw, fwd, bwd)
