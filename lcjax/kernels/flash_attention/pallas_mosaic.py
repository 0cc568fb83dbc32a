"""Flash attention as Pallas kernels for the Mosaic GPU backend (Hopper, sm_90a); forward returns (out, lse).

The same contract as :mod:`lcjax.kernels.flash_attention.xla` (its oracle) and the Triton kernels
(:mod:`lcjax.kernels.flash_attention.pallas_triton`), written with the Hopper techniques of
FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608) over the algorithms of FlashAttention-2
(Dao 2023, arXiv:2307.08691):

- warp specialisation: every CTA runs ``COMPUTE_WGS`` compute warpgroups, each owning one tile of rows, and
  one memory warpgroup that streams the tiles of the other side through a ring of ``stages`` shared-memory
  slots with TMA (``cp.async.bulk.tensor``); mbarriers say when a slot is full (TMA bytes arrived) and when
  every compute warpgroup has consumed it; the memory warpgroup gives its registers to the compute ones
  (``setmaxnreg``);
- every matmul is an asynchronous ``wgmma`` from shared memory (or registers for the probabilities), with
  float32 accumulators; every N is a tile (>= 64) or the head dim.

Kernels (three ``plgpu.kernel`` calls, no atomics):

- forward (Alg. 1): grid (query head, query block, batch); a query block is ``COMPUTE_WGS`` tiles of
  ``block_q`` rows, one per compute warpgroup; the memory warpgroup streams K, V and the keys'
  (position, segment) of the query head's kv head (GQA without repeating K/V);
- dQ: the same grid, streaming K, V; dQ = Σ dS·K with dS = P∘(dO·Vᵀ − delta);
- dK/dV: grid (kv head, key block, batch), compute warpgroups own key tiles (transposed scores, key rows),
  the memory warpgroup streams (query tile, query head of the group) pairs — Q, dO, lse and delta of that
  head — so the GQA sum happens in the accumulators.

Both backward kernels recompute the probabilities from the given (final, possibly ring-merged) ``lse`` with
delta = rowsum(dout · out), as the Triton kernels do.

Block sparsity: each CTA's loop runs only over the tiles that may hold a visible pair, with bounds computed
in XLA from the tiles' position and segment ranges (:mod:`lcjax.kernels.flash_attention.tiling`, for a
block of ``COMPUTE_WGS`` row tiles, valid for any positions and segment ids), read by the kernel from
shared memory. The loop is split in three: masked tiles, the run of tiles where every pair is visible
(matmul + online softmax, no mask), masked tiles again; all compute warpgroups of a CTA walk the same tiles,
so the memory warpgroup loads each tile once.

Numerics: scores are scaled by scale·log2(e) and exponentiated with exp2; scores, softmax statistics and
accumulators are float32; the probabilities (and dS) enter the second matmul in the input dtype (as in
FlashAttention-2/3). Inputs must be bfloat16 or float16: a float32 wgmma is TF32, which would break the
float32 contract, so float32 is refused (use ``pallas_triton`` or ``xla``).

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N = K·G; q_pos, q_seg int32 [B, T]; k_pos, k_seg int32
[B, S]. ``out`` float32 [B, T, N, H]; ``lse`` float32 [B, T, N] (−inf and ``out`` 0 for a query that sees
no key). H must be a multiple of 64 and at most 256 (wgmma's N and the swizzled 128-byte rows).

Tiles: ``block_q = block_k = None`` takes :data:`TILES` (per pass: rows per compute warpgroup, tile of the
streamed side, pipeline stages); integers override the tiles of every pass, rounded down to a multiple of
64 in [64, 128]. Lengths that are not a multiple of the blocks are padded (padded keys are masked by index
on the boundary tiles; padded queries are dropped).

``interpret=None`` compiles the kernels with Mosaic GPU when the program is compiled for GPUs (decided from
the program's devices, so a deviceless compile for an H100 builds the real kernels) and otherwise runs them
in JAX's Mosaic GPU interpreter (``jax._src.pallas.mosaic_gpu.interpret``, a private module of JAX 0.10.2
that simulates warpgroups, shared memory, TMA, barriers and wgmma on the CPU). Raises ValueError, with one
line, where the kernels cannot run: a GPU that is not sm_90 (H100/H200), a JAX without that interpreter, a
head dim or dtype the kernels do not support.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcjax.kernels.flash_attention import tiling
from lcjax.kernels.flash_attention.platform import target_device

PALLAS = True  # a Pallas kernel: a shard_map around it needs check_vma off (lcjax.kernels.flash_attention.api)

NEG_INF = float("-inf")
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
COMPUTE_WGS = 2  # compute warpgroups per CTA (FlashAttention-3's two consumer warpgroups)
WGMMA_M = 64  # rows of one warpgroup's wgmma; tiles are multiples of it
MAX_HEAD_DIM = 256
DTYPES = ("bfloat16", "float16")
HOPPER = ("h100", "h200")
# Registers per thread: compute warpgroups raise theirs, the memory warpgroup gives its own away
# (2 * 232 + 40 = 504 per lane of a warpgroup; 504 * 128 <= 65536).
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40


class PassTiles(NamedTuple):
    """Tiles of one kernel: ``rows`` per compute warpgroup, ``cols`` of the streamed side, ``stages``
    shared-memory slots of the streamed side."""

    rows: int
    cols: int
    stages: int


# Per pass: fwd and dq own query rows and stream key tiles; dkv owns key rows and streams query tiles.
TILES = {"fwd": PassTiles(64, 64, 3), "dq": PassTiles(64, 64, 2), "dkv": PassTiles(64, 64, 2)}


# ------------------------------------------------------------------------------------------- checks

def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] / [B, S, K, H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be divisible by kv heads {k.shape[2]}")
    h = q.shape[3]
    if h % 64 or h > MAX_HEAD_DIM:
        raise ValueError(f"attention.kernel 'pallas_mosaic' needs a head dim that is a multiple of 64 and at most "
                         f"{MAX_HEAD_DIM}, got {h}")
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"attention.kernel 'pallas_mosaic' needs q, k, v all bfloat16 or all float16 (a float32 "
                         f"wgmma is TF32), got {', '.join(sorted(dtypes))}")


def _interpret_params():
    """JAX's Mosaic GPU interpreter parameters, or None when this JAX has no such interpreter."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover - depends on the JAX version
        return None
    return InterpretGPUParams()


def resolve_interpret(interpret=None, device=None):
    """What ``plgpu.kernel`` gets as ``interpret``: False on an sm_90 GPU, the Mosaic GPU interpreter's
    parameters elsewhere (or when ``interpret`` is True).

    ``device``: (platform, device_kind), default the devices of the current trace. Raises ValueError (one
    line) for a GPU that is not an H100/H200 and when the interpreter is needed but missing.
    """
    from lcjax.kernels.flash_attention.triton_tiles import gpu_family

    platform, kind = target_device() if device is None else device
    if interpret is None:
        interpret = platform != "gpu"
    if not interpret:
        if platform != "gpu" or gpu_family(platform, kind) not in HOPPER:
            raise ValueError(f"attention.kernel 'pallas_mosaic' needs an sm_90 GPU (H100/H200); the program is "
                             f"compiled for {kind or platform}")
        return False
    params = _interpret_params()
    if params is None:
        raise ValueError(f"attention.kernel 'pallas_mosaic' cannot run on {platform}: this JAX ({jax.__version__}) "
                         f"has no Mosaic GPU interpreter; use a Hopper GPU or kernel 'pallas_triton'")
    return params


def pass_tiles(block_q=None, block_k=None) -> dict:
    """{"fwd" | "dq" | "dkv": PassTiles}: :data:`TILES`, or with ``block_q``/``block_k`` overriding the query
    and key tiles of every pass (rounded down to a multiple of 64, clamped to [64, 128]). Raises
    ValueError for a block < 1."""
    def fit(b, default):
        if b is None:
            return default
        if int(b) < 1:
            raise ValueError(f"block size {b} must be >= 1")
        return min(128, max(WGMMA_M, int(b) // WGMMA_M * WGMMA_M))

    out = {}
    for name, t in TILES.items():
        if name == "dkv":  # rows are keys, columns are queries
            out[name] = t._replace(rows=fit(block_k, t.rows), cols=fit(block_q, t.cols))
        else:
            out[name] = t._replace(rows=fit(block_q, t.rows), cols=fit(block_k, t.cols))
    return out


# ------------------------------------------------------------------------------------------ helpers

def _ids(pos, seg, size):
    """int32 [B, 2, size]: positions and segment ids (edge-padded), one array so one TMA copy loads both."""
    pos, seg = (tiling.pad_to(x.astype(jnp.int32), 1, size, "edge") for x in (pos, seg))
    return jnp.stack([pos, seg], axis=1)


def _smem_tile(shape, dtype):
    """A shared-memory buffer of 2-byte [.., rows, H] tiles in wgmma's swizzled layout (128-byte rows of
    64 elements, 8-row tiles)."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _rows(x_smem, layout_dim, interpreted):
    """Load a [rows] int32/float32 vector from shared memory in the layout of one wgmma accumulator axis
    (``layout_dim`` 1: a value per row, broadcast over columns; 0: a value per column). JAX's interpreter
    has no rule for ``plgpu.load`` (and no layouts): there it is a plain read."""
    if interpreted:
        return x_smem[...]
    return plgpu.load(x_smem, (), layout=plgpu.Layout.WGMMA.reduce(layout_dim))


def _bcast(x, shape, dim):
    return lax.broadcast_in_dim(x, shape, [dim])


def _visible(q_ids, k_ids, shape, *, causal, window, q_dim):
    """Bool ``shape`` (q_dim 0: [queries, keys]; 1: [keys, queries]): same segment, causal, window.
    q_ids, k_ids: (positions, segment ids) already in the accumulator's row/column layouts."""
    k_dim = 1 - q_dim
    qp, qs = (_bcast(x, shape, q_dim) for x in q_ids)
    kp, ks = (_bcast(x, shape, k_dim) for x in k_ids)
    mask = qs == ks
    if causal:
        mask &= kp <= qp
    if window is not None:
        mask &= qp - kp < window
    return mask


def _index_ok(start, shape, dim, length, interpreted):
    """Bool ``shape``: index start + i along ``dim`` lies before ``length`` (not padding)."""
    if interpreted:
        idx = lax.broadcasted_iota(jnp.int32, shape, dim)
    else:
        idx = plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
    return idx + start < length


def _full(shape, value, interpreted, reduce_dim=None):
    """A float32 constant in the wgmma accumulator layout (``reduce_dim``: of one of its axes); the
    interpreter knows no layouts."""
    x = jnp.full(shape, value, jnp.float32)
    if interpreted:
        return x
    layout = plgpu.Layout.WGMMA if reduce_dim is None else plgpu.Layout.WGMMA.reduce(reduce_dim)
    return plgpu.layout_cast(x, layout)


def _matmul(a, b, shape, interpreted, *, tb=False, acc=None):
    """float32 (acc +) a @ b (b transposed when ``tb``) by wgmma: a from shared memory or registers in the
    wgmma layout, b from shared memory; ``acc`` None starts from a fresh accumulator of ``shape``,
    otherwise wgmma accumulates into its registers.

    JAX's interpreter knows neither a transposed wgmma operand nor ``run_state``: there the tiles are read
    from shared memory and multiplied by ``jnp.dot`` (same operand dtypes, float32 accumulation)."""
    if interpreted:
        a_val = a if isinstance(a, jax.Array) else a[...]
        b_val = b[...]
        prod = lax.dot_general(a_val, b_val, (((1,), (1 if tb else 0,)), ((), ())),
                               preferred_element_type=jnp.float32)
        return prod if acc is None else acc + prod
    b = plgpu.transpose_ref(b, (1, 0)) if tb else b

    if acc is None:
        def fresh(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _stream(steps, stages, loads):
    """The memory warpgroup's loop: for step in [0, steps), wait until every compute warpgroup released
    the step's slot (step % stages) and issue its TMA loads. ``loads``: [(issue(step, slot),
    consumed_barriers)]; each group waits on its own barrier just before its loads, so a slot's K can be
    refilled while its V is still being read. Ends after every slot's last use was released."""
    for i in range(stages):
        @pl.when(i < steps)
        def _prologue():
            for issue, _ in loads:
                issue(jnp.int32(i), i)

    def body(it, carry):
        step = it + stages
        slot = lax.rem(it, jnp.int32(stages))
        for issue, consumed in loads:
            plgpu.barrier_wait(consumed.at[slot])
            issue(step, slot)
        return carry

    lax.fori_loop(0, jnp.maximum(steps - stages, 0), body, None)
    # Drain: observe the release of each slot's last use, so every phase of the release barriers is seen
    # (a barrier phase nobody waits for is an error in JAX's interpreter; on the GPU it costs nothing).
    for i in range(stages):
        @pl.when(i < steps)
        def _drain():
            for _, consumed in loads:
                plgpu.barrier_wait(consumed.at[i])


def _three_loops(lo, flo, fhi, hi, step, carry, expand=1):
    """Run ``step(it, j, e, carry, masked)`` over the tiles j in [lo, flo) masked, [flo, fhi) unmasked,
    [fhi, hi) masked, each visited ``expand`` times (e in [0, expand)); ``it`` counts the visits from 0
    (the pipeline step)."""
    def loop(a, b, masked, carry):
        def body(i, c):
            j = a + lax.div(i, jnp.int32(expand)) if expand > 1 else a + i
            e = lax.rem(i, jnp.int32(expand)) if expand > 1 else jnp.int32(0)
            return step((a - lo) * expand + i, j, e, c, masked)

        return lax.fori_loop(0, (b - a) * expand, body, carry)

    carry = loop(lo, flo, True, carry)
    carry = loop(flo, fhi, False, carry)
    return loop(fhi, hi, True, carry)


def _bounds_from_smem(bnd_smem):
    return tuple(bnd_smem[i] for i in range(4))


def _compiler_params():
    return plgpu.CompilerParams(approx_math=True)


def _kernel_call(body, *, out_type, scratch, grid, grid_names, name, interpret):
    """``plgpu.kernel`` with ``COMPUTE_WGS`` compute warpgroups + 1 memory warpgroup (thread axis "wg")."""
    kw = {} if interpret is False else {"interpret": interpret}
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                        num_threads=COMPUTE_WGS + 1, thread_name="wg", compiler_params=_compiler_params(),
                        kernel_name=name, **kw)


BOUNDS_WIDTH = 32  # (lo, flo, fhi, hi) padded to 128 bytes: a warpgroup's TMA moves a multiple of 128 bytes


def _padded_bounds(bnd):
    """int32 [B, rows, 4] loop bounds padded to [B, rows, BOUNDS_WIDTH]."""
    return tiling.pad_to(bnd, 2, BOUNDS_WIDTH)


def _load_bounds(bnd_ref, bnd_smem, bnd_bar, row, wg):
    """(lo, flo, fhi, hi) of this CTA's block: one TMA per warpgroup into its own row, then scalar reads."""
    plgpu.copy_gmem_to_smem(bnd_ref.at[row], bnd_smem.at[wg], bnd_bar.at[wg])
    plgpu.barrier_wait(bnd_bar.at[wg])
    return tuple(bnd_smem[wg, i] for i in range(4))


# -------------------------------------------------------------------------------------------- forward

def _fwd_kernel(bnd_ref, q_ref, k_ref, v_ref, qids_ref, kids_ref, o_ref, lse_ref,
                q_smem, k_smem, v_smem, qids_smem, kids_smem, o_smem, lse_smem, bnd_smem,
                q_bar, k_bar, v_bar, bnd_bar, k_free, v_free,
                *, causal, window, scale, tiles, groups, s_len, interpreted):
    """One block of COMPUTE_WGS query tiles of one head: online softmax (FlashAttention-2 Alg. 1, base 2)."""
    bq, bk, stages = tiles
    hp = q_smem.shape[-1]
    b, head, blk = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("blocks")
    wg = lax.axis_index("wg")
    kvh = lax.div(head, jnp.int32(groups))
    lo, flo, fhi, hi = _load_bounds(bnd_ref, bnd_smem, bnd_bar, (b, blk), wg)
    c = scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q0 = blk * (COMPUTE_WGS * bq) + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), head], q_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(qids_ref.at[b, :, pl.ds(q0, bq)], qids_smem.at[wg], q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        q_ids = (_rows(qids_smem.at[wg, 0], 1, interpreted), _rows(qids_smem.at[wg, 1], 1, interpreted))
        shape = (bq, bk)

        def step(it, j, _e, carry, masked):
            m, l, acc = carry
            slot = lax.rem(it, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            s = _matmul(q_smem.at[wg], k_smem.at[slot], shape, interpreted, tb=True) * c
            if masked:
                k_ids = (_rows(kids_smem.at[slot, 0], 0, interpreted), _rows(kids_smem.at[slot, 1], 0, interpreted))
                mask = _visible(q_ids, k_ids, shape, causal=causal, window=window, q_dim=0)
                mask &= _index_ok(j * bk, shape, 1, s_len, interpreted)
                s = jnp.where(mask, s, NEG_INF)
            plgpu.barrier_arrive(k_free.at[slot])
            m_new = jnp.maximum(m, s.max(axis=1))
            m_use = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
            p = jnp.exp2(s - _bcast(m_use, shape, 0))  # masked scores are −inf: p = 0
            alpha = jnp.exp2(m - m_use)
            l = l * alpha + p.sum(axis=1)
            acc = acc * _bcast(alpha, acc.shape, 0)
            plgpu.barrier_wait(v_bar.at[slot])
            acc = _matmul(p.astype(v_smem.dtype), v_smem.at[slot], acc.shape, interpreted, acc=acc)
            plgpu.barrier_arrive(v_free.at[slot])
            return m_new, l, acc

        init = (_full((bq,), NEG_INF, interpreted, 1), _full((bq,), 0.0, interpreted, 1),
                _full((bq, hp), 0.0, interpreted))
        m, l, acc = _three_loops(lo, flo, fhi, hi, step, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_smem.at[wg][...] = acc / _bcast(l_safe, acc.shape, 0)  # acc = 0 where nothing was seen
        lse_smem.at[wg][...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, NEG_INF)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, pl.ds(q0, bq), head], commit_group=False)
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(q0, bq)], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def load_k(step, slot):
            cols = pl.ds((lo + step) * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kvh], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(kids_ref.at[b, :, cols], kids_smem.at[slot], k_bar.at[slot])

        def load_v(step, slot):
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds((lo + step) * bk, bk), kvh], v_smem.at[slot], v_bar.at[slot])

        _stream(hi - lo, stages, [(load_k, k_free), (load_v, v_free)])


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None, scale=None,
                  block_q=None, block_k=None, interpret=None):
    """Flash attention forward (FlashAttention-2 Alg. 1 with FlashAttention-3's Hopper pipeline) as a
    Mosaic GPU kernel.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], all bfloat16 or all float16, N divisible by K (query head n
        uses kv head n // (N/K)), H a multiple of 64, at most 256.
      q_pos, q_seg: int32 [B, T]; k_pos, k_seg: int32 [B, S] — key j is visible to query i when
        seg_j = seg_i, (causal ⇒ pos_j ≤ pos_i), (window W ⇒ pos_i − pos_j < W).
      scale: score scale, default 1/√H.
      block_q, block_k: None = :data:`TILES`; integers override them (module docstring).
      interpret: None = Mosaic GPU on an H100/H200, JAX's Mosaic GPU interpreter when not compiled for
        GPUs; True forces the interpreter (:func:`resolve_interpret`).
    Returns:
      (out float32 [B, T, N, H], lse float32 [B, T, N]); a query that sees no key gets out 0, lse −inf.
    Raises:
      ValueError for inconsistent shapes, an unsupported head dim or dtype, a block < 1, or devices the
      kernel cannot run on.
    """
    _check(q, k, v)
    interp = resolve_interpret(interpret)
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    scale = h ** -0.5 if scale is None else float(scale)
    tiles = pass_tiles(block_q, block_k)["fwd"]
    bq, bk, stages = tiles
    block = COMPUTE_WGS * bq
    tp, sp = tiling.round_up(t, block), tiling.round_up(s_len, bk)
    q_ = tiling.pad_to(q, 1, tp)
    k_, v_ = (tiling.pad_to(x, 1, sp) for x in (k, v))
    qids, kids = _ids(q_pos, q_seg, tp), _ids(k_pos, k_seg, sp)
    bnd = tiling.bounds(qids[:, 0], qids[:, 1], kids[:, 0], kids[:, 1], tile_q=block, tile_k=bk, t_len=t,
                        s_len=s_len, causal=causal, window=window)
    dt = q.dtype
    scratch = [
        _smem_tile((COMPUTE_WGS, bq, h), dt),  # q
        _smem_tile((stages, bk, h), dt),  # k
        _smem_tile((stages, bk, h), dt),  # v
        plgpu.SMEM((COMPUTE_WGS, 2, bq), jnp.int32),  # query (position, segment)
        plgpu.SMEM((stages, 2, bk), jnp.int32),  # key (position, segment)
        plgpu.SMEM((COMPUTE_WGS, bq, h), jnp.float32),  # out
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # lse
        plgpu.SMEM((COMPUTE_WGS + 1, BOUNDS_WIDTH), jnp.int32),  # loop bounds
        plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),  # q + its ids arrived
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k + its ids arrived
        plgpu.Barrier(num_barriers=stages),  # v arrived
        plgpu.Barrier(num_barriers=COMPUTE_WGS + 1),  # bounds arrived
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # k slot free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # v slot free
    ]
    body = functools.partial(_fwd_kernel, causal=causal, window=window, scale=scale, tiles=tiles,
                             groups=n // kh, s_len=s_len, interpreted=interp is not False)
    out, lse = _kernel_call(
        body, out_type=[jax.ShapeDtypeStruct((b, tp, n, h), jnp.float32),
                        jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        scratch=scratch, grid=(n, tp // block, b), grid_names=("heads", "blocks", "batch"),
        name="lcjax_mosaic_fwd", interpret=interp)(_padded_bounds(bnd), q_, k_, v_, qids, kids)
    return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))


# ------------------------------------------------------------------------------------------- backward

def _dq_kernel(bnd_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qids_ref, kids_ref, dq_ref,
               q_smem, do_smem, lse_smem, dl_smem, qids_smem, k_smem, v_smem, kids_smem, dq_smem, bnd_smem,
               q_bar, k_bar, v_bar, bnd_bar, k_free, v_free,
               *, causal, window, scale, tiles, groups, s_len, interpreted):
    """dQ of one block of COMPUTE_WGS query tiles of one head (FlashAttention-2 Alg. 2, dQ part)."""
    bq, bk, stages = tiles
    hp = q_smem.shape[-1]
    b, head, blk = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("blocks")
    wg = lax.axis_index("wg")
    kvh = lax.div(head, jnp.int32(groups))
    lo, flo, fhi, hi = _load_bounds(bnd_ref, bnd_smem, bnd_bar, (b, blk), wg)
    c = scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q0 = blk * (COMPUTE_WGS * bq) + wg * bq
        rows = pl.ds(q0, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], lse_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(dl_ref.at[b, head, rows], dl_smem.at[wg], q_bar.at[wg])
        plgpu.copy_gmem_to_smem(qids_ref.at[b, :, rows], qids_smem.at[wg], q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        q_ids = (_rows(qids_smem.at[wg, 0], 1, interpreted), _rows(qids_smem.at[wg, 1], 1, interpreted))
        lse2 = _rows(lse_smem.at[wg], 1, interpreted)
        delta = _rows(dl_smem.at[wg], 1, interpreted)
        shape = (bq, bk)

        def step(it, j, _e, dq, masked):
            slot = lax.rem(it, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            s = _matmul(q_smem.at[wg], k_smem.at[slot], shape, interpreted, tb=True) * c
            if masked:
                k_ids = (_rows(kids_smem.at[slot, 0], 0, interpreted), _rows(kids_smem.at[slot, 1], 0, interpreted))
                mask = _visible(q_ids, k_ids, shape, causal=causal, window=window, q_dim=0)
                mask &= _index_ok(j * bk, shape, 1, s_len, interpreted)
                s = jnp.where(mask, s, NEG_INF)
            p = jnp.exp2(s - _bcast(lse2, shape, 0))  # lse2 = +inf where the query sees nothing: p = 0
            plgpu.barrier_wait(v_bar.at[slot])
            dp = _matmul(do_smem.at[wg], v_smem.at[slot], shape, interpreted, tb=True)
            plgpu.barrier_arrive(v_free.at[slot])
            ds = p * (dp - _bcast(delta, shape, 0))
            dq = _matmul(ds.astype(k_smem.dtype), k_smem.at[slot], dq.shape, interpreted, acc=dq)
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = _three_loops(lo, flo, fhi, hi, step, _full((bq, hp), 0.0, interpreted))
        dq_smem.at[wg][...] = dq * scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[b, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def load_k(step, slot):
            cols = pl.ds((lo + step) * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kvh], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(kids_ref.at[b, :, cols], kids_smem.at[slot], k_bar.at[slot])

        def load_v(step, slot):
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds((lo + step) * bk, bk), kvh], v_smem.at[slot], v_bar.at[slot])

        _stream(hi - lo, stages, [(load_k, k_free), (load_v, v_free)])


def _dkv_kernel(bnd_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qids_ref, kids_ref, dk_ref, dv_ref,
                k_smem, v_smem, kids_smem, q_smem, do_smem, lse_smem, dl_smem, qids_smem, out_smem, bnd_smem,
                kv_bar, q_bar, do_bar, bnd_bar, q_free, do_free,
                *, causal, window, scale, tiles, groups, interpreted):
    """dK, dV of one block of COMPUTE_WGS key tiles of one kv head (FlashAttention-2 Alg. 2, transposed:
    key rows); the memory warpgroup streams (query tile, query head of the group) pairs, so the GQA sum
    stays in the accumulators. ``lse_ref`` holds lse·log2(e), +inf for a query that sees nothing or is
    padding (its probabilities are 0 on every tile)."""
    bk, bq, stages = tiles
    hp = k_smem.shape[-1]
    b, kvh, blk = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("blocks")
    wg = lax.axis_index("wg")
    lo, flo, fhi, hi = _load_bounds(bnd_ref, bnd_smem, bnd_bar, (b, blk), wg)
    c = scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        k0 = blk * (COMPUTE_WGS * bk) + wg * bk
        rows = pl.ds(k0, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[wg], kv_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[wg], kv_bar.at[wg])
        plgpu.copy_gmem_to_smem(kids_ref.at[b, :, rows], kids_smem.at[wg], kv_bar.at[wg])
        plgpu.barrier_wait(kv_bar.at[wg])
        k_ids = (_rows(kids_smem.at[wg, 0], 1, interpreted), _rows(kids_smem.at[wg, 1], 1, interpreted))
        shape = (bk, bq)

        def step(it, _i, _g, carry, masked):
            dk, dv = carry
            slot = lax.rem(it, jnp.int32(stages))
            plgpu.barrier_wait(q_bar.at[slot])
            st = _matmul(k_smem.at[wg], q_smem.at[slot], shape, interpreted, tb=True) * c
            if masked:
                q_ids = (_rows(qids_smem.at[slot, 0], 0, interpreted), _rows(qids_smem.at[slot, 1], 0, interpreted))
                st = jnp.where(_visible(q_ids, k_ids, shape, causal=causal, window=window, q_dim=1), st, NEG_INF)
            pt = jnp.exp2(st - _bcast(_rows(lse_smem.at[slot], 0, interpreted), shape, 1))
            plgpu.barrier_wait(do_bar.at[slot])
            dv = _matmul(pt.astype(do_smem.dtype), do_smem.at[slot], dv.shape, interpreted, acc=dv)
            dpt = _matmul(v_smem.at[wg], do_smem.at[slot], shape, interpreted, tb=True)
            dst = pt * (dpt - _bcast(_rows(dl_smem.at[slot], 0, interpreted), shape, 1))
            plgpu.barrier_arrive(do_free.at[slot])
            dk = _matmul(dst.astype(q_smem.dtype), q_smem.at[slot], dk.shape, interpreted, acc=dk)
            plgpu.barrier_arrive(q_free.at[slot])
            return dk, dv

        zeros = _full((bk, hp), 0.0, interpreted)
        dk, dv = _three_loops(lo, flo, fhi, hi, step, (zeros, zeros), expand=groups)
        out = out_smem.at[wg]
        out[...] = dk * scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out, dk_ref.at[b, rows, kvh])
        plgpu.wait_smem_to_gmem(0)  # the buffer is read before dV overwrites it
        out[...] = dv
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out, dv_ref.at[b, rows, kvh])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        def where(step):
            i = lo + lax.div(step, jnp.int32(groups))
            return pl.ds(i * bq, bq), kvh * groups + lax.rem(step, jnp.int32(groups))

        def load_q(step, slot):
            cols, head = where(step)
            plgpu.copy_gmem_to_smem(q_ref.at[b, cols, head], q_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, head, cols], lse_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(qids_ref.at[b, :, cols], qids_smem.at[slot], q_bar.at[slot])

        def load_do(step, slot):
            cols, head = where(step)
            plgpu.copy_gmem_to_smem(do_ref.at[b, cols, head], do_smem.at[slot], do_bar.at[slot])
            plgpu.copy_gmem_to_smem(dl_ref.at[b, head, cols], dl_smem.at[slot], do_bar.at[slot])

        _stream((hi - lo) * groups, stages, [(load_q, q_free), (load_do, do_free)])


def _dq_scratch(tiles, h: int, dt):
    """Shared memory and barriers of the dQ kernel (per compute warpgroup: its query rows; per stage: a
    key tile)."""
    bq, bk, stages = tiles
    return [
        _smem_tile((COMPUTE_WGS, bq, h), dt),  # q
        _smem_tile((COMPUTE_WGS, bq, h), dt),  # dout
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # lse·log2(e)
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # delta
        plgpu.SMEM((COMPUTE_WGS, 2, bq), jnp.int32),  # query (position, segment)
        _smem_tile((stages, bk, h), dt),  # k
        _smem_tile((stages, bk, h), dt),  # v
        plgpu.SMEM((stages, 2, bk), jnp.int32),  # key (position, segment)
        plgpu.SMEM((COMPUTE_WGS, bq, h), jnp.float32),  # dq
        plgpu.SMEM((COMPUTE_WGS + 1, BOUNDS_WIDTH), jnp.int32),
        plgpu.Barrier(num_arrivals=5, num_barriers=COMPUTE_WGS),  # q, dout, lse, delta, ids arrived
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k + ids arrived
        plgpu.Barrier(num_barriers=stages),  # v arrived
        plgpu.Barrier(num_barriers=COMPUTE_WGS + 1),  # bounds arrived
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # k slot free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # v slot free
    ]


def _dkv_scratch(tiles, h: int, dt):
    """Shared memory and barriers of the dK/dV kernel (per compute warpgroup: its key rows; per stage: a
    query tile)."""
    bk, bq, stages = tiles
    return [
        _smem_tile((COMPUTE_WGS, bk, h), dt),  # k
        _smem_tile((COMPUTE_WGS, bk, h), dt),  # v
        plgpu.SMEM((COMPUTE_WGS, 2, bk), jnp.int32),  # key (position, segment)
        _smem_tile((stages, bq, h), dt),  # q
        _smem_tile((stages, bq, h), dt),  # dout
        plgpu.SMEM((stages, bq), jnp.float32),  # lse·log2(e)
        plgpu.SMEM((stages, bq), jnp.float32),  # delta
        plgpu.SMEM((stages, 2, bq), jnp.int32),  # query (position, segment)
        plgpu.SMEM((COMPUTE_WGS, bk, h), jnp.float32),  # dk, then dv
        plgpu.SMEM((COMPUTE_WGS + 1, BOUNDS_WIDTH), jnp.int32),
        plgpu.Barrier(num_arrivals=3, num_barriers=COMPUTE_WGS),  # k, v, ids arrived
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # q, lse, ids arrived
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dout, delta arrived
        plgpu.Barrier(num_barriers=COMPUTE_WGS + 1),  # bounds arrived
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # q slot free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # dout slot free
    ]


def flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None,
                   scale=None, block_q=None, block_k=None, interpret=None):
    """Gradients of flash attention (FlashAttention-2 Alg. 2) as two Mosaic GPU kernels (dQ; dK and dV).

    ``out`` and ``lse`` are the final output and log-sum-exp, which may already include other key blocks
    (ring attention): probabilities are recomputed as exp(s − lse) and delta = rowsum(dout · out).

    Args: as :func:`flash_forward`, plus out [B, T, N, H], lse float32 [B, T, N], dout [B, T, N, H] (cast
      to q's dtype for the matmuls).
    Returns:
      (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H]), float32; zero for queries/keys that see
      nothing (rows with lse = −inf).
    Raises:
      ValueError as :func:`flash_forward`.
    """
    _check(q, k, v)
    interp = resolve_interpret(interpret)
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h ** -0.5 if scale is None else float(scale)
    tiles = pass_tiles(block_q, block_k)
    dq_t, kv_t = tiles["dq"], tiles["dkv"]
    q_block, k_block = COMPUTE_WGS * dq_t.rows, COMPUTE_WGS * kv_t.rows
    tp = tiling.round_up(t, math.lcm(q_block, kv_t.cols))
    sp = tiling.round_up(s_len, math.lcm(dq_t.cols, k_block))
    dt = q.dtype

    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    lse_ = tiling.pad_to(jnp.transpose(tiling.lse2(lse), (0, 2, 1)), 2, tp, value=jnp.inf)
    dl_ = tiling.pad_to(jnp.transpose(delta, (0, 2, 1)), 2, tp)
    q_, do_ = tiling.pad_to(q, 1, tp), tiling.pad_to(dout.astype(dt), 1, tp)
    k_, v_ = (tiling.pad_to(x, 1, sp) for x in (k, v))
    qids, kids = _ids(q_pos, q_seg, tp), _ids(k_pos, k_seg, sp)
    args = (q_, k_, v_, do_, lse_, dl_, qids, kids)
    bounds = functools.partial(tiling.bounds, qids[:, 0], qids[:, 1], kids[:, 0], kids[:, 1], t_len=t,
                               s_len=s_len, causal=causal, window=window)
    static = dict(causal=causal, window=window, scale=scale, groups=g, interpreted=interp is not False)

    bq, bk, stages = dq_t
    dq_scratch = _dq_scratch(dq_t, h, dt)
    dq = _kernel_call(
        functools.partial(_dq_kernel, tiles=dq_t, s_len=s_len, **static),
        out_type=jax.ShapeDtypeStruct((b, tp, n, h), jnp.float32), scratch=dq_scratch,
        grid=(n, tp // q_block, b), grid_names=("heads", "blocks", "batch"), name="lcjax_mosaic_bwd_dq",
        interpret=interp)(_padded_bounds(bounds(tile_q=q_block, tile_k=bk)), *args)

    bk, bq, stages = kv_t
    kv_scratch = _dkv_scratch(kv_t, h, dt)
    dk, dv = _kernel_call(
        functools.partial(_dkv_kernel, tiles=kv_t, **static),
        out_type=[jax.ShapeDtypeStruct((b, sp, kh, h), jnp.float32)] * 2, scratch=kv_scratch,
        grid=(kh, sp // k_block, b), grid_names=("heads", "blocks", "batch"), name="lcjax_mosaic_bwd_dkv",
        interpret=interp)(_padded_bounds(bounds(tile_q=bq, tile_k=k_block, by_key=True)), *args)
    return dq[:, :t], dk[:, :s_len], dv[:, :s_len]
