"""Flash attention through cuDNN's fused attention (the kernel behind
``jax.nn.dot_product_attention(..., implementation="cudnn")``), under the per-device contract of
:mod:`lcjax.kernels.flash_attention.xla`: forward -> (out, lse), backward from the final (out, lse).

What cuDNN can express. JAX 0.10 exposes, per call, one mask for the whole [T, S] score matrix: none,
causal aligned top-left (key index j visible to query index i when j ≤ i), or causal with a sliding window
of W (i − W < j ≤ i), plus padding and packed-sequence options that this module does not use. Our masks come
from positions and segment ids (key j visible to query i when seg_j = seg_i, pos_j ≤ pos_i if causal,
pos_i − pos_j < W with a window). So both blocks are cut into static tiles (``block_q`` × ``block_k``; None =
the whole block: one tile each; the ring passes the two half blocks of the zigzag layout) and every
(query tile, key tile) pair is classified at run time from its positions and segment ids
(:func:`pair_class`), the same class for every batch row:

- ``empty``: no key visible to any query (segment ranges disjoint, every key after every query, or every
  key W or more behind) — skipped: out 0, lse −inf;
- ``full``: one shared segment and every key visible to every query (max key position ≤ min query position
  if causal; max query − min key position < W with a window) — cuDNN without a mask;
- ``diagonal``: causal, tiles of equal length, one shared segment, and both tiles the *same contiguous
  position range* (pos[t] = pos[0] + t, equal starts). Then pos_j ≤ pos_i ⇔ j ≤ i and pos_i − pos_j < W ⇔
  i − j < W, exactly cuDNN's top-left causal mask and its sliding window of W (cuDNN's window is
  ``sliding_window_length`` = W: "(pos − W, pos]");
- ``unsupported``: anything else (partial masks at an offset, documents inside a tile, positions that are not
  contiguous ranges, rows of the batch that disagree). Its out, lse and gradients are NaN — never silently
  wrong — and the configurations that can reach it are refused before they run: :func:`layout_refusal`
  (impl/layout/window), :func:`positions_refusal` (concrete positions) and the config rule of
  ``attention.kernel: cudnn`` (lcjax.config).

The forward of a query tile merges its key tiles' (out, lse) by the log-sum-exp rule (as the ring merges
blocks). Why cuDNN's own lse: ``jax.nn.dot_product_attention(return_residual=True)`` returns the softmax
log-sum-exp (FlashAttention-2, arXiv:2307.08691, §3.1.1) but cast to the output dtype; a bfloat16 lse of
magnitude 10 is off by up to 0.03, i.e. 3 % in the merge weights. So this module calls the function that API
wraps (``jax._src.cudnn.fused_attention_stablehlo``: its forward primitive in training mode, bound as that
API binds it), which returns it in float32 ([B, N, T], natural log of the scaled scores' exponential sum —
the same residual as the public API's XLA path, ``logsumexp(scale·q·kᵀ)``), and transposes it to [B, T, N].

Backward from the final (out, lse) — the ring's contract (the ring's backward passes the output and lse of
the whole sequence, merged over all blocks). cuDNN's backward (FlashAttention-2 Alg. 2) takes Q, K, V, the
forward output O, the softmax statistics L and dO, and computes P_ij = exp(scale·q_i·k_j − L_i) on the
visible pairs, D_i = Σ_h dO_ih·O_ih, dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ = scale·dS·K,
dK = scale·dSᵀ·Q. The gradient of the global attention o_i = Σ_j P*_ij v_j (P*_ij = exp(s_ij − L*_i) over
*all* keys of the sequence, L* the global lse) with respect to the keys of one tile is, by the softmax
Jacobian, dv_j = Σ_i P*_ij dO_i and ds_ij = P*_ij (dO_i·v_j − Σ_j' P*_ij' dO_i·v_j')
= P*_ij (dP_ij − dO_i·O*_i) with O* the global output. So calling cuDNN's backward on one tile pair with
the *global* L* and O* as its residuals gives exactly the global gradient's part from that pair (P = P*,
D = dO·O*); summing over the tile pairs (dQ over key tiles, dK/dV over query tiles) and over the ring's
blocks gives the whole gradient. JAX binds that backward only inside its ``custom_vjp`` (with the
forward's own residuals); this module binds the same primitive (``_dot_product_attention_bwd_p_wrapper``)
with the given residuals, its operands named from the JAX version's own ``_dot_product_attention_bwd_impl``
signature (:func:`_bind`). A tile pair that reaches cuDNN is ``full`` or ``diagonal``, where every query
sees a key, so L* is finite there.

Numerics: cuDNN returns out and dq/dk/dv in the input dtype (bfloat16/float16; float32 accumulation
inside); this module widens them to float32, so each tile pair's result is rounded once to the input dtype
before the float32 merge and sums. Scores and softmax statistics are float32 inside cuDNN.

Limits, refused at the start with one line (:func:`check_inputs`): q/k/v bfloat16 or float16 (same dtype);
head dim a multiple of 8 and ≤ 256 (cuDNN; ≤ 128 before Hopper, judged from the device kind); N divisible by
K (GQA is native: query head n uses kv head n // (N/K), no repeated K/V); square tiles; at most
:data:`MAX_TILE_PAIRS` tile pairs.
A program compiled for anything but GPUs raises RuntimeError at trace time (the primitives have no CPU
lowering). A deviceless compile for an H100/H200 target (lcjax.sharding.mesh.deviceless_gpus) compiles
the ``__cudnn$fmhaSoftmax``/``__cudnn$fmhaSoftmaxBackward`` custom calls without the cuDNN library (checked
in CI: tests/kernels/test_cudnn.py); ``jax.nn.dot_product_attention`` itself refuses to trace without the library
("cuDNN not found"), and nothing cuDNN runs on a CPU host.

Shapes: q [B, T, N, H]; k, v [B, S, K, H]; q_pos, q_seg int32 [B, T]; k_pos, k_seg int32 [B, S]. ``out``
float32 [B, T, N, H]; ``lse`` float32 [B, T, N]. Kernels take plain arrays and never a config.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
from jax import lax

from lcjax.kernels.flash_attention.platform import target_device
from lcjax.kernels.flash_attention.xla import fit_block
from lcjax.ops.vma import vary_tree_like

NEG_INF = -jnp.inf
CLASSES = ("empty", "full", "diagonal", "unsupported")  # pair_class values 0..3, in this order
EMPTY, FULL, DIAGONAL, UNSUPPORTED = range(4)
DTYPES = ("bfloat16", "float16")
MAX_HEAD_DIM = 256  # cuDNN flash attention on Hopper and later (JAX itself refuses > 128 before Hopper)
MAX_TILE_PAIRS = 64  # (T / block_q) · (S / block_k): every pair is one branch of a lax.switch per call
RING_IMPLS = ("ring", "hybrid")


# ------------------------------------------------------------------------------------ refusal rules

def check_arrays(q, k, v) -> None:
    """Raise ValueError (one line naming the rule) unless q [B, T, N, H], k, v [B, S, K, H] are what
    cuDNN's flash attention takes: one dtype among :data:`DTYPES`, a head dim that is a multiple of 8 and
    at most :data:`MAX_HEAD_DIM`, N divisible by K."""
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"attention.kernel 'cudnn' takes q, k, v of one dtype among {', '.join(DTYPES)} "
                         f"(cuDNN flash attention), got {', '.join(sorted(dtypes))}")
    h, n, kh = q.shape[-1], q.shape[2], k.shape[2]
    if h % 8 or h > MAX_HEAD_DIM:
        raise ValueError(f"attention.kernel 'cudnn' needs a head dim that is a multiple of 8 and <= "
                         f"{MAX_HEAD_DIM} (cuDNN flash attention), got {h}")
    if n % kh:
        raise ValueError(f"query heads {n} must be divisible by kv heads {kh} (GQA)")


def check_inputs(q, k, v, block_q=None, block_k=None) -> tuple[int, int]:
    """:func:`check_arrays`, then the tiles (block_q, block_k) for q [B, T, N, H] and k, v [B, S, K, H]:
    None is the whole length, integers are clipped to divisors of the lengths (``xla.fit_block``);
    ValueError for tiles that are not square when T = S, or more than :data:`MAX_TILE_PAIRS` tile pairs."""
    check_arrays(q, k, v)
    t, s = q.shape[1], k.shape[1]
    bq = t if block_q is None else fit_block(t, int(block_q))
    bk = s if block_k is None else fit_block(s, int(block_k))
    if bq != bk and t == s:
        raise ValueError(f"attention.kernel 'cudnn' needs square tiles (block_q = block_k): a diagonal pair "
                         f"of {bq} x {bk} is not cuDNN's causal mask")
    if (t // bq) * (s // bk) > MAX_TILE_PAIRS:
        raise ValueError(f"attention.kernel 'cudnn': tiles {bq} x {bk} cut {t} x {s} into "
                         f"{(t // bq) * (s // bk)} pairs, more than {MAX_TILE_PAIRS}; use larger "
                         f"attention.block_q/block_k (or null: whole blocks)")
    return bq, bk


def layout_refusal(impl: str, layout: str, shards: int, window, ulysses_size=None) -> str | None:
    """Why cuDNN cannot run attention ``impl`` in ``layout`` over ``shards`` sequence shards (with
    ``window`` W or None), or None when every tile pair the kernel meets is empty, full or diagonal for
    positions that run contiguously through the sequence in one segment (what :func:`positions_refusal`
    checks). Pure Python: the same rules as the config's (lcjax.config, ``attention.kernel: cudnn``).

    With one shard there is one block and one tile: diagonal. Otherwise a shard's tokens must be
    contiguous position ranges: contiguous (one range) or zigzag (two half blocks, the ring's tiles);
    not striped (every P-th position) nor balanced (chunks dispatched by work). ``allgather`` attends to the
    other shards' blocks concatenated (not one range); ``ulysses`` (and ``hybrid`` with ``ulysses_size`` =
    P) gathers the whole sequence in layout order (contiguous only). A window cuts ring steps between
    different blocks at an offset from the diagonal, which cuDNN's window (aligned to the diagonal) cannot
    express: with a window only the diagonal step may exist, i.e. one ring position (one shard, ``local``,
    ``ulysses``, ``hybrid`` with ``ulysses_size`` = P).
    """
    if shards <= 1:
        return None
    if layout not in ("contiguous", "zigzag"):
        return (f"attention.kernel 'cudnn' needs attention.layout contiguous or zigzag on {shards} sequence "
                f"shards: a {layout} shard's tokens are not contiguous position ranges")
    if impl == "allgather":
        return ("attention.kernel 'cudnn' cannot run attention.impl allgather: the gathered keys of the "
                "other shards are not one contiguous position range")
    ring_positions = shards if impl == "ring" else (shards // ulysses_size if impl == "hybrid" and ulysses_size
                                                     else 1)
    if impl in ("ulysses", "hybrid") and ring_positions == 1 and layout != "contiguous":
        return (f"attention.kernel 'cudnn' with attention.impl {impl} over the whole sequence axis needs "
                f"attention.layout contiguous: the gathered {layout} sequence is not contiguous in position")
    if window is not None and ring_positions > 1:
        return (f"attention.kernel 'cudnn' cannot combine attention.window with a ring of {ring_positions} "
                f"positions (impl {impl}): steps between blocks need a window off the diagonal, which cuDNN "
                f"cannot express; use impl ulysses with layout contiguous, or kernel xla/pallas")
    return None


def positions_refusal(positions, segment_ids) -> str | None:
    """Host check of concrete int [B, T] positions and segment ids in the original token order: why cuDNN
    cannot express their mask, or None when every row is one segment whose positions are one contiguous
    range (pos[t] = pos[0] + t), the only kind for which :func:`layout_refusal`'s layouts yield empty,
    full and diagonal tile pairs only. Documents (several segment ids in a row) need the mask between
    segment ids, which this kernel does not build from cuDNN's sequence-length options."""
    pos, seg = np.asarray(positions, np.int64), np.asarray(segment_ids, np.int64)
    if np.any(seg != seg[:, :1]):
        return ("attention.kernel 'cudnn' needs one segment per sequence (cross-document attention): the "
                "mask between documents is not expressible with cuDNN's masks here")
    if np.any(pos - pos[:, :1] != np.arange(pos.shape[1])):
        return ("attention.kernel 'cudnn' needs positions that run contiguously through each sequence "
                "(pos[t] = pos[0] + t): other positions are not expressible with cuDNN's masks")
    return None


# ------------------------------------------------------------------------------------ classification

def _row_stats(pos, seg):
    """Per row of int32 [B, L]: (min pos, max pos, min seg, max seg, contiguous, first pos)."""
    contiguous = jnp.all(pos - pos[:, :1] == jnp.arange(pos.shape[1], dtype=pos.dtype), axis=1)
    return (jnp.min(pos, 1), jnp.max(pos, 1), jnp.min(seg, 1), jnp.max(seg, 1), contiguous, pos[:, 0])


def pair_class(q_pos, k_pos, q_seg, k_seg, *, causal, window):
    """The class (index into :data:`CLASSES`) of one (query tile, key tile) pair: int32 scalar.

    q_pos, q_seg int32 [B, bq]; k_pos, k_seg int32 [B, bk]. A class holds when it holds for every batch
    row (module docstring); ``empty`` is judged from ranges like ``xla.block_may_be_visible``, so it also
    covers tiles of any positions.
    """
    qmin, qmax, qsmin, qsmax, qcont, qstart = _row_stats(q_pos, q_seg)
    kmin, kmax, ksmin, ksmax, kcont, kstart = _row_stats(k_pos, k_seg)
    empty = (ksmin > qsmax) | (ksmax < qsmin)
    one_segment = (qsmin == qsmax) & (ksmin == ksmax) & (qsmin == ksmin)
    full = one_segment
    if causal:
        empty |= kmin > qmax
        full &= kmax <= qmin
    if window is not None:
        empty |= kmax <= qmin - window
        full &= qmax - kmin < window
    diagonal = one_segment & qcont & kcont & (qstart == kstart)
    diagonal &= bool(causal and q_pos.shape[1] == k_pos.shape[1])
    return jnp.where(jnp.all(empty), EMPTY, jnp.where(jnp.all(full), FULL, jnp.where(
        jnp.all(diagonal), DIAGONAL, UNSUPPORTED))).astype(jnp.int32)


def _diagonal_window(window, length: int):
    """cuDNN's ``sliding_window_length`` for a diagonal pair of ``length`` tokens: W, or None when the
    window cannot cut inside the tile (W ≥ length)."""
    return None if window is None or window >= length else int(window)


# ------------------------------------------------------------------------------------ cuDNN calls

HOPPER_OR_LATER = ("H100", "H200", "H800", "H20", "GH200", "B100", "B200", "GB200")  # device-kind tags


def _fused_attention(head_dim: int):
    """JAX's cuDNN fused-attention module, after checking that the program is compiled for GPUs; raises
    RuntimeError (one line) otherwise, and ValueError for a head dim above 128 on a GPU older than Hopper
    (cuDNN's limit there)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    platform, kind = target_device()
    if platform != "gpu":
        raise RuntimeError(f"attention.kernel 'cudnn' runs on NVIDIA GPUs only (cuDNN fused attention); this "
                           f"program is compiled for {platform}")
    if head_dim > 128 and kind and not any(tag in kind for tag in HOPPER_OR_LATER):
        raise ValueError(f"attention.kernel 'cudnn': head dim {head_dim} > 128 needs a Hopper or later GPU, "
                         f"got {kind}")
    return fa


def _bind(fa, primitive, impl, operands: dict, params: dict):
    """Bind one of cuDNN's primitives with operands and parameters by name, in the order of this JAX's
    ``impl`` (``_dot_product_attention_fwd_impl``/``_bwd_impl``: the operands changed between JAX versions,
    0.10 added sequence offsets and page tables). RuntimeError (one line) for a name this module does not
    supply. The public wrapper (``fused_attention_stablehlo.dot_product_attention``) is not used: it refuses
    to trace without the cuDNN library even for a deviceless GPU compile, and its backward cannot be given
    other residuals."""
    names = list(inspect.signature(impl).parameters)
    unknown = [n for n in names if n not in operands and n not in params]
    if unknown:
        raise RuntimeError(f"attention.kernel 'cudnn': this JAX's cuDNN attention takes {', '.join(unknown)}, "
                           f"which lcjax does not supply (written against JAX 0.10)")
    return primitive.bind(*(operands[n] for n in names if n in operands),
                          **{n: params[n] for n in names if n in params})


def _operands(fa, q, k, v, *, scale, diagonal, window):
    """The operands and parameters shared by cuDNN's forward and backward: no bias, padding, packing or
    paging (zero-size placeholders, as JAX passes them), no dropout, BTNH layout, the mask."""
    unused = jnp.zeros(0, q.dtype)
    operands = dict(query=q, key=k, value=v, bias=unused, q_seqlen=unused, kv_seqlen=unused,
                    q_offsets=unused, kv_offsets=unused, page_table_k=unused, page_table_v=unused)
    params = dict(scale=scale, seed=0, dropout_rate=0.0, variadic_args=(False, False),
                  mask_type=fa.MaskType.CAUSAL if diagonal else fa.MaskType.NO_MASK,
                  layout=fa.AttentionLayout.BTNH.value, sliding_window_length=window if diagonal else None)
    return operands, params


def _cudnn_forward(q, k, v, *, scale, diagonal, window):
    """One cuDNN forward: (out float32 [B, T, N, H], lse float32 [B, T, N]); no mask, or (``diagonal``)
    the top-left causal mask with sliding window ``window`` (None: none). The primitive is bound as
    ``jax.nn.dot_product_attention(..., implementation="cudnn", return_residual=True)`` binds it (training
    mode: it returns the softmax statistics), keeping the statistics in float32."""
    fa = _fused_attention(q.shape[-1])
    operands, params = _operands(fa, q, k, v, scale=scale, diagonal=diagonal, window=window)
    out, stats = _bind(fa, fa._dot_product_attention_fwd_p_wrapper, fa._dot_product_attention_fwd_impl,
                       operands, {**params, "is_training": True})[:2]
    return out.astype(jnp.float32), jnp.transpose(stats, (0, 2, 1)).astype(jnp.float32)


def _cudnn_backward(q, k, v, out, lse, dout, *, scale, diagonal, window):
    """cuDNN's backward of one call given the (global) out [B, T, N, H] and lse float32 [B, T, N]:
    (dq, dk, dv) float32 (module docstring for why the global residuals give the global gradient)."""
    fa = _fused_attention(q.shape[-1])
    operands, params = _operands(fa, q, k, v, scale=scale, diagonal=diagonal, window=window)
    operands.update(activation=jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32),
                    fwd_output=out.astype(q.dtype), grad_output=dout.astype(q.dtype))
    dq, dk, dv = _bind(fa, fa._dot_product_attention_bwd_p_wrapper, fa._dot_product_attention_bwd_impl,
                       operands, params)[:3]
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


# ------------------------------------------------------------------------------------ the contract

def _merge(out_a, lse_a, out_b, lse_b):
    """Log-sum-exp merge of two partial results over disjoint keys (as lcjax.parallel.ring.merge)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(lse == NEG_INF, 0.0, lse)
    return out_a * jnp.exp(lse_a - safe)[..., None] + out_b * jnp.exp(lse_b - safe)[..., None], lse


def _tiles(x, size: int, axis: int = 1):
    """Static slices of ``x`` along ``axis`` of ``size`` elements each."""
    return [lax.slice_in_dim(x, i, i + size, axis=axis) for i in range(0, x.shape[axis], size)]


def flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None, scale=None,
                  block_q=None, block_k=None):
    """Attention forward through cuDNN: (out float32 [B, T, N, H], lse float32 [B, T, N]).

    Args: q [B, T, N, H], k, v [B, S, K, H] bfloat16/float16; positions and segment ids int32 [B, T] /
    [B, S]; ``causal``, ``window`` W, ``scale`` (None: 1/√H) as lcjax.ops.attention.reference;
    ``block_q``/``block_k`` the tiles (None: whole lengths).
    Returns: out 0 and lse −inf for a query that sees no key; NaN for a tile pair cuDNN cannot express
    (module docstring).
    Raises: ValueError from :func:`check_inputs` (and for a head dim > 128 before Hopper); RuntimeError when
    the program is not compiled for GPUs or this JAX's cuDNN primitives take operands lcjax does not know.
    """
    bq, bk = check_inputs(q, k, v, block_q, block_k)
    b, t, n, h = q.shape
    scale = h ** -0.5 if scale is None else float(scale)
    refs = (q, k, v, q_pos, k_pos, q_seg, k_seg)
    same = lambda x: vary_tree_like(x, *refs)
    diag_window = _diagonal_window(window, bq)
    branches = (
        lambda qt, kt, vt: same((jnp.zeros((b, bq, n, h), jnp.float32), jnp.full((b, bq, n), NEG_INF))),
        lambda qt, kt, vt: same(_cudnn_forward(qt, kt, vt, scale=scale, diagonal=False, window=None)),
        lambda qt, kt, vt: same(_cudnn_forward(qt, kt, vt, scale=scale, diagonal=True, window=diag_window)),
        lambda qt, kt, vt: same((jnp.full((b, bq, n, h), jnp.nan), jnp.full((b, bq, n), jnp.nan))),
    )
    k_tiles = list(zip(*(_tiles(x, bk) for x in (k, v, k_pos, k_seg))))
    outs, lses = [], []
    for qt, qp, qs in zip(*(_tiles(x, bq) for x in (q, q_pos, q_seg))):
        acc = None
        for kt, vt, kp, ks in k_tiles:
            cls = pair_class(qp, kp, qs, ks, causal=causal, window=window)
            part = lax.switch(cls, branches, qt, kt, vt)
            acc = part if acc is None else _merge(*acc, *part)
        outs.append(acc[0])
        lses.append(acc[1])
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def flash_backward(q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg, *, causal=True, window=None,
                   scale=None, block_q=None, block_k=None):
    """Gradients through cuDNN's backward given the final ``out`` and ``lse`` (which may include other key
    blocks, as in ring attention; module docstring for the derivation).

    Args: as :func:`flash_forward`, plus out [B, T, N, H], lse float32 [B, T, N], dout [B, T, N, H].
    Returns: (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, H]) float32; NaN from a tile pair cuDNN cannot
    express.
    Raises: as :func:`flash_forward`.
    """
    bq, bk = check_inputs(q, k, v, block_q, block_k)
    h = q.shape[-1]
    scale = h ** -0.5 if scale is None else float(scale)
    refs = (q, k, v, out, lse, dout, q_pos, k_pos, q_seg, k_seg)
    same = lambda x: vary_tree_like(x, *refs)
    diag_window = _diagonal_window(window, bq)
    zeros = lambda qt, kt: (jnp.zeros(qt.shape, jnp.float32), jnp.zeros(kt.shape, jnp.float32),
                            jnp.zeros(kt.shape, jnp.float32))
    nans = lambda qt, kt: tuple(jnp.full_like(z, jnp.nan) for z in zeros(qt, kt))
    branches = (
        lambda qt, kt, vt, ot, lt, dt: same(zeros(qt, kt)),
        lambda qt, kt, vt, ot, lt, dt: same(_cudnn_backward(qt, kt, vt, ot, lt, dt, scale=scale,
                                                            diagonal=False, window=None)),
        lambda qt, kt, vt, ot, lt, dt: same(_cudnn_backward(qt, kt, vt, ot, lt, dt, scale=scale,
                                                            diagonal=True, window=diag_window)),
        lambda qt, kt, vt, ot, lt, dt: same(nans(qt, kt)),
    )
    k_tiles = list(zip(*(_tiles(x, bk) for x in (k, v, k_pos, k_seg))))
    dks = [None] * len(k_tiles)
    dvs = [None] * len(k_tiles)
    dqs = []
    for qt, ot, lt, dt, qp, qs in zip(*(_tiles(x, bq) for x in (q, out, lse, dout, q_pos, q_seg))):
        dq = None
        for j, (kt, vt, kp, ks) in enumerate(k_tiles):
            cls = pair_class(qp, kp, qs, ks, causal=causal, window=window)
            dqt, dkt, dvt = lax.switch(cls, branches, qt, kt, vt, ot, lt, dt)
            dq = dqt if dq is None else dq + dqt
            dks[j] = dkt if dks[j] is None else dks[j] + dkt
            dvs[j] = dvt if dvs[j] is None else dvs[j] + dvt
        dqs.append(dq)
    return jnp.concatenate(dqs, axis=1), jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1)
