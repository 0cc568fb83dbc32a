"""Bytes one device sends per layer (forward and backward) for TP all-reduces, ring ppermutes and
Ulysses all-to-alls, and the time a collective takes.

Cost model (NVIDIA nccl-tests ``doc/PERFORMANCE.md``, formulas §2.1): on n ranks an all-reduce of S bytes
sends 2(n−1)/n·S per rank; reduce-scatter and all-gather (n−1)/n·S; an all-to-all whose aggregate
message is M sends (n−1)·M/n² per rank; a ppermute sends its block. Time = bytes sent / per-direction
link bandwidth. Formulas per scheme: formulas §2.2 (Korthikanti et al. 2022 §4.2; DeepSpeed-Ulysses blog;
Liu et al. 2023 Alg. 1 and zhuzilin/ring-flash-attention, whose dK/dV travel in float32 as lcjax's do).
``tokens`` is the per-device token count (B/dp)·(T/sp); ``cb`` the compute dtype's bytes.
Positions and segment ids travelling with lcjax's K/V (8 bytes per token per hop) are left out
(< 0.1 % for LLaMA-2-7B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lcjax.plan.shapes import Shape, local_heads

ATTENTION_IMPLS = ("ring", "ulysses", "hybrid", "allgather", "local")


@dataclass(frozen=True)
class LayerComm:
    """Bytes one device sends for one layer: over ``model`` (TP) and over ``sequence`` (attention)."""

    tp_fwd: int
    tp_bwd: int
    seq_fwd: int
    seq_bwd: int

    @property
    def total(self) -> int:
        return self.tp_fwd + self.tp_bwd + self.seq_fwd + self.seq_bwd

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def tp_bytes(s: Shape, tokens: int, tp: int, cb: int = 2) -> int:
    """Megatron TP, one direction (forward = backward): two all-reduces of [tokens, D] (after the attention
    output and the MLP down projection): 2·2(t−1)/t·tokens·D·cb. 7B, T=32768, t=4: 805,306,368."""
    return 4 * (tp - 1) * tokens * s.D * cb // tp


def ring_bytes(s: Shape, tokens: int, sp: int, tp: int = 1, cb: int = 2) -> tuple[int, int]:
    """Ring attention (forward, backward): forward P−1 hops of the local K and V blocks
    (P−1)·2·tokens·d_kv'·cb; backward the same K/V hops plus dK, dV (float32) travelling P hops:
    + P·2·tokens·d_kv'·4. d_kv' = kv heads on this ``model`` shard × H.
    7B, T=32768, P=4: 402,653,184 and 1,476,395,008."""
    if sp == 1:
        return 0, 0
    kv = local_heads(s, tp)[1] * s.H
    fwd = (sp - 1) * 2 * tokens * kv * cb
    return fwd, fwd + sp * 2 * tokens * kv * 4


def allgather_bytes(s: Shape, tokens: int, sp: int, tp: int = 1, cb: int = 2) -> tuple[int, int]:
    """All-gather context parallelism (Llama 3; lcjax.parallel.allgather), (forward, backward): forward an
    all-gather of K and V, (P−1)/P of the gathered P·2·tokens·d_kv'·cb; backward the same all-gather again
    plus a float32 reduce-scatter of dK, dV: + (P−1)·2·tokens·d_kv'·4. d_kv' = kv heads on this ``model``
    shard × H. 7B, T=32768, P=4: 402,653,184 and 1,207,959,552."""
    if sp == 1:
        return 0, 0
    kv = local_heads(s, tp)[1] * s.H
    fwd = (sp - 1) * 2 * tokens * kv * cb
    return fwd, fwd + (sp - 1) * 2 * tokens * kv * 4


def _across_groups(s: Shape, tokens: int, sp: int, group: int, tp: int, cb: int) -> tuple[int, int, int]:
    """(all-to-all bytes inside the Ulysses group, each way; groups; bytes of one group's K and V per unit
    of element size: 2·group·tokens·max(kv heads, group)/group·H) — what :func:`grouped_allgather_bytes`
    and :func:`hybrid_bytes` move across the sp/group groups."""
    kv = max(local_heads(s, tp)[1], group) // group * s.H
    return ulysses_bytes(s, tokens, group, tp, cb), sp // group, 2 * group * tokens * kv


def grouped_allgather_bytes(s: Shape, tokens: int, sp: int, group: int, tp: int = 1,
                            cb: int = 2) -> tuple[int, int]:
    """All-gather inside Ulysses groups of ``group`` shards (lcjax.parallel.ulysses.across_groups),
    (forward, backward): the Ulysses all-to-alls inside the group (:func:`ulysses_bytes` over ``group``
    shards, each way) plus the all-gather of K and V across the sp/group groups for the group's
    group·tokens tokens and this shard's max(kv heads, group)/group kv heads (its reduce-scatter of dK, dV
    in float32 in the backward), as :func:`allgather_bytes` does over the whole axis."""
    if sp == 1:
        return 0, 0
    a2a, groups, kv = _across_groups(s, tokens, sp, group, tp, cb)
    fwd = (groups - 1) * kv * cb
    return a2a + fwd, a2a + fwd + (groups - 1) * kv * 4


def hybrid_bytes(s: Shape, tokens: int, sp: int, group: int, tp: int = 1, cb: int = 2) -> tuple[int, int]:
    """Ulysses inside groups of ``group`` shards and a ring across the sp/group groups (USP; ``hybrid``),
    (forward, backward): the all-to-alls (:func:`ulysses_bytes` over ``group`` shards, each way) plus
    :func:`ring_bytes`' terms for a ring of sp/group positions carrying group·tokens tokens of
    max(kv heads, group)/group kv heads."""
    if sp == 1:
        return 0, 0
    a2a, groups, kv = _across_groups(s, tokens, sp, group, tp, cb)
    if groups == 1:
        return a2a, a2a
    fwd = (groups - 1) * kv * cb
    return a2a + fwd, a2a + fwd + groups * kv * 4


def ulysses_bytes(s: Shape, tokens: int, sp: int, tp: int = 1, cb: int = 2) -> int:
    """DeepSpeed-Ulysses, one direction (forward = backward): all-to-all of Q, K, V and of the output, the
    aggregate message (sequence-wide) being sp·tokens·(2·D' + 2·d_kv')·cb, so each device sends
    (P−1)/P²·M. D' = N/tp·H; d_kv' = max(kv heads on the shard, P)·H (kv heads repeated when fewer than P).
    7B, T=32768, P=4: 201,326,592."""
    if sp == 1:
        return 0
    n_loc, k_loc = local_heads(s, tp)
    aggregate = sp * tokens * (2 * n_loc + 2 * max(k_loc, sp)) * s.H * cb
    return (sp - 1) * aggregate // (sp * sp)


def layer_comm(s: Shape, tokens: int, *, sp: int, tp: int, impl: str = "ring", cb: int = 2,
               ulysses_size: int | None = None) -> LayerComm:
    """:class:`LayerComm` of one layer on one device for attention ``impl`` (ATTENTION_IMPLS); for
    ``hybrid`` (:func:`hybrid_bytes`) and ``allgather`` with ``ulysses_size`` > 1
    (:func:`grouped_allgather_bytes`), the Ulysses group's size. Raises ValueError for another impl or a
    hybrid without a group dividing ``sp``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} must be one of {', '.join(ATTENTION_IMPLS)}")
    tp_one = tp_bytes(s, tokens, tp, cb)
    if impl == "ring":
        fwd, bwd = ring_bytes(s, tokens, sp, tp, cb)
    elif impl == "hybrid":
        if not ulysses_size or sp % ulysses_size:
            raise ValueError(f"attention impl 'hybrid' needs a ulysses_size dividing {sp}, got {ulysses_size}")
        fwd, bwd = hybrid_bytes(s, tokens, sp, ulysses_size, tp, cb)
    elif impl == "allgather" and ulysses_size not in (None, 1):
        fwd, bwd = grouped_allgather_bytes(s, tokens, sp, ulysses_size, tp, cb)
    elif impl == "allgather":
        fwd, bwd = allgather_bytes(s, tokens, sp, tp, cb)
    elif impl == "ulysses":
        fwd = bwd = ulysses_bytes(s, tokens, sp, tp, cb)
    else:
        fwd = bwd = 0
    return LayerComm(tp_one, tp_one, fwd, bwd)


def all_reduce_bytes(size: int, n: int) -> int:
    """Bytes one rank sends in an all-reduce of ``size`` bytes over n ranks: 2(n−1)/n·size."""
    return 2 * (n - 1) * size // n


def gradient_sync_bytes(param_bytes_local: int, group: int, optimizer_sharding: str) -> int:
    """Per-step bytes a device sends to reduce float32 gradients over the data × sequence group: an
    all-reduce (or reduce-scatter + all-gather of the updated parameters, the same bytes, for zero1/zero2);
    FSDP adds an all-gather of the parameters for the backward: 3·(g−1)/g·size."""
    if optimizer_sharding == "fsdp":
        return 3 * (group - 1) * param_bytes_local // group
    return all_reduce_bytes(param_bytes_local, group)
