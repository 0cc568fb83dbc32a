"""One training step per device, analytically: memory, communication, FLOPs, time, tokens/s and MFU.

Time model (an estimate; every input is named): compute = hardware FLOPs / (peak · efficiency);
TP all-reduces, Ulysses all-to-alls and the embedding's all-reduce wait for the network (exposed); the
layers' gradient reduction runs inside the backward's layer loop (plain all-reduces, or FSDP's
reduce-scatters; lcjax.train.step.in_loop_grad_axes) under the next layer's backward, only its excess and
the last layer's exposed, while ZeRO-1/2's and the other weights' reductions wait after the loop; a ring
hop hides under the attention of the block in hand and only its excess is exposed (Liu et al. 2023,
arXiv:2310.01889 §3). A contiguous-layout causal ring runs at P/(2P−1) of balanced speed in attention
(formulas §6); zigzag and striped are taken as balanced. Collectives use the
intra-node bandwidth when their devices lie within one node (mesh order data, sequence, model: ``model``
is innermost), else the inter-node one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lcjax import config as config_lib
from lcjax.plan import comm, flops, memory
from lcjax.plan import offload as offload_lib
from lcjax.plan.hardware import Device
from lcjax.plan.memory import ActivationSpec, MemoryBytes, gathered_kv_bytes, memory_per_device
from lcjax.plan.shapes import Shape, layer_matrix_elements_per_device, param_elements_per_device


@dataclass(frozen=True)
class StepInputs:
    """What a step's cost depends on. Mesh sizes (data, sequence, model); ``compute_bytes`` 2 (bfloat16)
    or 4 (float32); ``attention`` ring, ulysses, hybrid, allgather or local; ``remat`` none, layer or full;
    ``optimizer_sharding`` none, zero1, zero2 or fsdp; ``activation_model`` lcjax or formulas; ``stored_bytes`` 4 models the CPU
    backend keeping bfloat16 activations as float32 (None: ``compute_bytes``) (lcjax.plan.memory);
    ``mlp_tile`` / ``loss_tile`` tokens per shard of a tiled MLP / loss (0: untiled); ``offload`` none, layer
    or saved, ``seq_chunk`` and ``head_chunks`` as ``train.*`` (lcjax.plan.offload, lcjax.plan.memory);
    ``sequence_tp``: sequence-parallel TP in effect (hidden states between TP regions split over ``model``;
    the TP all-gathers and reduce-scatters run under the projections' matmuls); ``ulysses_size``: the
    Ulysses group of ``hybrid``, or inside which ``allgather`` runs (``attention.ulysses_size``; None:
    the whole axis)."""

    shape: Shape
    seq_len: int
    global_batch: int
    data: int = 1
    sequence: int = 1
    model: int = 1
    attention: str = "ring"
    layout: str = "zigzag"
    compute_bytes: int = 2
    param_bytes: int = 4
    remat: str = "none"
    optimizer_sharding: str = "none"
    activation_model: str = "lcjax"
    stored_bytes: int | None = None
    mlp_tile: int = 0
    loss_tile: int = 0
    offload: str = "none"
    seq_chunk: int = 0
    head_chunks: int = 1
    sequence_tp: bool = False
    ulysses_size: int | None = None

    @property
    def devices(self) -> int:
        return self.data * self.sequence * self.model

    @property
    def tokens_per_device(self) -> int:
        """(B/dp)·(T/sp): the tokens whose activations one device holds."""
        return self.global_batch // self.data * self.seq_len // self.sequence

    @classmethod
    def from_config(cls, cfg: config_lib.Config, *, attention: str | None = None, remat: str | None = None,
                    optimizer_sharding: str | None = None, activation_model: str = "lcjax",
                    stored_bytes: int | None = None, offload: str | None = None) -> "StepInputs":
        """Inputs of a (validated) lcjax config; ``attention`` overrides ``attention.impl``, ``remat`` and
        ``optimizer_sharding`` the config's (None: read from ``train.remat`` — the selective policies
        counted as ``full``, a lower bound — and ``train.fsdp`` / ``train.shard_optimizer``), ``offload``
        ``train.offload``."""
        t = cfg.train
        if remat is None:
            remat = t.remat if t.remat in ("none", "layer") else "full"
        if optimizer_sharding is None:
            optimizer_sharding = "fsdp" if t.fsdp else "zero2" if t.shard_optimizer else "none"
        return cls(shape=Shape.from_model_config(cfg.model), seq_len=cfg.data.seq_len,
                   global_batch=cfg.data.global_batch, data=cfg.mesh.data, sequence=cfg.mesh.sequence,
                   model=cfg.mesh.model, attention=attention or cfg.attention.impl, layout=cfg.attention.layout,
                   compute_bytes=4 if t.dtype == "float32" else 2,
                   param_bytes=4 if t.param_dtype == "float32" else 2, remat=remat,
                   optimizer_sharding=optimizer_sharding, activation_model=activation_model,
                   stored_bytes=stored_bytes, mlp_tile=t.mlp_tile, loss_tile=t.loss_tile,
                   offload=t.offload if offload is None else offload, seq_chunk=t.seq_chunk,
                   head_chunks=t.head_chunks, sequence_tp=sequence_tp_applies(cfg),
                   ulysses_size=(cfg.attention.ulysses_size
                                 if (attention or cfg.attention.impl) in ("hybrid", "allgather") else None))


def sequence_tp_applies(cfg: config_lib.Config) -> bool:
    """Whether the model runs sequence-parallel TP for ``cfg`` (as lcjax.model.llama.splits_tokens decides
    it): ``train.sequence_parallel_tp``, mesh.model > 1, no ``train.seq_chunk``, and the tokens per
    sequence shard divisible by mesh.model."""
    t, m = cfg.train, cfg.mesh
    local = config_lib.padded_seq_len(cfg.data.seq_len, cfg.attention.layout, m.sequence) // m.sequence
    return t.sequence_parallel_tp and m.model > 1 and not t.seq_chunk and local % m.model == 0


@dataclass(frozen=True)
class StepPlan:
    """The analytic result for one mesh on one device type (bytes, seconds, tokens/s, fractions)."""

    inputs: StepInputs
    device: Device
    memory: MemoryBytes
    layer_comm: comm.LayerComm
    step_comm_bytes: int
    compute_s: float
    comm_exposed_s: float
    flops_per_token: dict
    offload: offload_lib.OffloadPlan | None = None  # host bytes and PCIe time (lcjax.plan.offload)

    @property
    def step_time_s(self) -> float:
        return self.compute_s + self.comm_exposed_s

    @property
    def tokens_per_sec_per_device(self) -> float:
        i = self.inputs
        return i.global_batch * i.seq_len / i.devices / self.step_time_s

    @property
    def mfu(self) -> dict:
        """Model FLOPs utilisation, causal-honest and PaLM convention (formulas §3.3)."""
        peak = self.device.peak(self.inputs.compute_bytes)
        return {k: self.tokens_per_sec_per_device * v / peak for k, v in self.flops_per_token.items()}

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device.memory_bytes

    @property
    def over_by_bytes(self) -> int:
        return max(0, self.memory.total - self.device.memory_bytes)


def model_flops(s: Shape, T: int) -> dict:
    """{'causal', 'palm'} model FLOPs per token (lcjax.plan.flops)."""
    return {"causal": flops.flops_per_token(s, T, causal=True), "palm": flops.flops_per_token(s, T, causal=False)}


def _attention_seconds(i: StepInputs, rate: float) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's attention on one device; backward = 2.5× forward
    (FlashAttention-2 §4); a contiguous causal ring is slowed by (2P−1)/P."""
    fwd = flops.attention_forward_flops_per_token(i.shape, i.seq_len) * i.tokens_per_device / i.model / rate
    if i.attention in ("ring", "allgather") and i.layout == "contiguous" and i.sequence > 1:
        fwd *= (2 * i.sequence - 1) / i.sequence
    return fwd, 2.5 * fwd


def _layer_exposed_seconds(i: StepInputs, lc: comm.LayerComm, dev: Device, rate: float) -> float:
    """Seconds one layer waits on the network (forward + backward)."""
    tp_s = (lc.tp_fwd + lc.tp_bwd) / dev.bandwidth(i.model) if i.model > 1 else 0.0
    if i.sequence_tp:  # collective matmuls: the transfers run under the projections (fwd + 2× bwd matmuls)
        tp_s = max(0.0, tp_s - 3 * _projection_seconds(i, rate))
    if i.sequence == 1:
        return tp_s
    bw = dev.bandwidth(i.sequence * i.model)
    if i.attention == "ulysses":
        return tp_s + (lc.seq_fwd + lc.seq_bwd) / bw
    # the ring hides each hop under a block's attention; the all-gather only under the local block's
    # (inside Ulysses groups of U: after the exposed all-to-alls, a ring of sp/U positions, or the gather
    # under the group's own block, U/sp of the keys)
    u = i.ulysses_size if i.attention in ("hybrid", "allgather") and i.ulysses_size not in (None, 1) else 1
    a2a = comm.ulysses_bytes(i.shape, i.tokens_per_device, u, i.model, i.compute_bytes) if u > 1 else 0
    positions = i.sequence // u
    hidden = (positions - 1) / positions if i.attention in ("ring", "hybrid") else u / i.sequence
    fwd, bwd = _attention_seconds(i, rate)
    return (tp_s + 2 * a2a / bw + max(0.0, (lc.seq_fwd - a2a) / bw - fwd * hidden)
            + max(0.0, (lc.seq_bwd - a2a) / bw - bwd * hidden))


def _grad_sync_exposed_seconds(i: StepInputs, compute_s: float, rate: float, bw: float) -> float:
    """Seconds the data × sequence gradient reduction waits on the network (``bw`` bytes/s). Without
    ZeRO-1/2 each layer's reduction runs in the backward's layer loop (the trainer's in-loop all-reduce on
    the GPU kernels' path, FSDP's reduce-scatters) under the next layer's backward — the backward seconds
    per layer being (compute − the model's forward) / L — so only the excess and the last layer's are
    exposed; the embedding, head and final norm (and everything under ZeRO-1/2) after the loop."""
    s, group, sharding = i.shape, i.data * i.sequence, i.optimizer_sharding
    layer = layer_matrix_elements_per_device(s, i.model) + 2 * s.D
    rest = param_elements_per_device(s, i.model) - s.L * layer
    sync = lambda elements: comm.gradient_sync_bytes(elements * 4, group, sharding) / bw
    if sharding in ("zero1", "zero2"):
        return sync(s.L * layer + rest)
    forward_s = flops.flops_per_token(s, i.seq_len, causal=True) / 3 * i.tokens_per_device / i.model / rate
    backward_layer_s = max(0.0, compute_s - forward_s) / s.L
    return (s.L - 1) * max(0.0, sync(layer) - backward_layer_s) + sync(layer) + sync(rest)


def _activation_split(i: StepInputs) -> int:
    """Over how many shards the hidden states between TP regions are split in the memory estimate: tp
    under sequence-parallel TP for the ``formulas`` model (Korthikanti et al. 2022 §4.2.2); 1 for the
    ``lcjax`` model, whose per-layer residuals XLA was not measured to split: LLaMA-2-7B at 32k on mesh
    8,4,2 (H100 targets) compiles to 14.27 GB per device without and 13.71 GB with it (−0.56 GB), where
    splitting the layer inputs and norm internals would predict −3.3 GB (docs/planner.md)."""
    return i.model if i.sequence_tp and i.activation_model == "formulas" else 1


def _projection_seconds(i: StepInputs, rate: float) -> float:
    """Forward seconds of one layer's projection and MLP matmuls on one device: 2·(layer weights / tp)
    FLOPs per token (the work the sequence-parallel TP transfers run under)."""
    s = i.shape
    weights = s.D * (2 * s.N * s.H + 2 * s.K * s.H) + 3 * s.D * s.F
    return 2 * weights * i.tokens_per_device / i.model / rate


def _tile_tokens(i: StepInputs, tile: int) -> int | None:
    """Tokens of one tile on a device ((B/dp)·tile), or None when untiled."""
    return i.global_batch // i.data * tile if tile else None


def plan_step(i: StepInputs, dev: Device) -> StepPlan:
    """The :class:`StepPlan` of ``i`` on device ``dev``."""
    s, cb, tokens = i.shape, i.compute_bytes, i.tokens_per_device
    group = i.data * i.sequence
    acts = ActivationSpec(remat=i.remat, model=i.activation_model, compute_bytes=cb, param_bytes=i.param_bytes,
                          stored_bytes=i.stored_bytes, mlp_tokens=_tile_tokens(i, i.mlp_tile),
                          loss_tokens=_tile_tokens(i, i.loss_tile), chunk_tokens=_tile_tokens(i, i.seq_chunk),
                          head_chunks=i.head_chunks, split=_activation_split(i))
    working = (gathered_kv_bytes(s, tokens, i.sequence, i.model, cb, i.ulysses_size) if i.attention == "allgather"
               else 0)
    memory = memory_per_device(s, tokens, i.model, group, acts, optimizer_sharding=i.optimizer_sharding,
                               attention_working=working)
    lc = comm.layer_comm(s, tokens, sp=i.sequence, tp=i.model, impl=i.attention, cb=cb, ulysses_size=i.ulysses_size)
    if i.remat != "none":  # the recomputed forward communicates again (the ring only under ``layer``)
        lc = replace(lc, tp_fwd=2 * lc.tp_fwd, seq_fwd=(2 if i.remat == "layer" else 1) * lc.seq_fwd)
    rate = dev.peak(cb) * dev.efficiency
    off = offload_lib.plan_offload(s, i.seq_len, tokens, i.model, i.remat, i.offload,
                                   i.stored_bytes or cb, rate, dev.host_bw)
    memory = replace(memory, activations=memory.activations - off.device_bytes_saved)
    compute_s = flops.hardware_flops_per_token(s, i.seq_len, i.remat) * tokens / i.model / rate
    grads = comm.gradient_sync_bytes(param_elements_per_device(s, i.model) * 4, group, i.optimizer_sharding)
    embed = comm.all_reduce_bytes(tokens * s.D * cb, i.model)
    exposed = (s.L * _layer_exposed_seconds(i, lc, dev, rate)
               + _grad_sync_exposed_seconds(i, compute_s, rate, dev.bandwidth(i.devices))
               + (embed / dev.bandwidth(i.model) if i.model > 1 else 0.0))
    return StepPlan(i, dev, memory, lc, grads + embed, compute_s, exposed, model_flops(s, i.seq_len), off)


def mesh_factorisations(n: int) -> list[tuple[int, int, int]]:
    """Every (data, sequence, model) with data·sequence·model = n, ordered by model then sequence."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return [(n // (m * q), q, m) for m in divisors for q in divisors if (n // m) % q == 0]


def ulysses_rule(s: Shape, sp: int, tp: int) -> str | None:
    """The all-to-all's head constraint: sp must divide the query heads of a ``model`` shard."""
    if (s.N // tp) % sp:
        return f"attention ulysses needs mesh.sequence {sp} to divide n_heads/mesh.model = {s.N // tp}"
    return None


def check_options(attention: str, remat: str, optimizer_sharding: str, activation_model: str) -> None:
    """Raise ValueError naming the first option outside its choices."""
    for name, value, allowed in (("--attention", attention, comm.ATTENTION_IMPLS),
                                 ("--remat", remat, flops.REMAT_POLICIES),
                                 ("--optimizer-sharding", optimizer_sharding, memory.OPTIMIZER_SHARDINGS),
                                 ("--activations", activation_model, memory.ACTIVATION_MODELS)):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} must be one of {', '.join(allowed)}")


def candidates(cfg: config_lib.Config, n_devices: int, dev: Device, *, attention: str | None = None,
               remat: str | None = None, optimizer_sharding: str | None = None, activation_model: str = "lcjax"):
    """(plans, rejected) for every factorisation of ``n_devices``. A mesh is kept when the config with that
    mesh passes lcjax.config.validate (and the Ulysses head rule); ``rejected`` lists (mesh, reason).
    ``remat`` / ``optimizer_sharding`` None: the config's (:meth:`StepInputs.from_config`)."""
    impl = attention or cfg.attention.impl
    own = StepInputs.from_config(cfg, remat=remat, optimizer_sharding=optimizer_sharding)
    remat, optimizer_sharding = own.remat, own.optimizer_sharding
    check_options(impl, remat, optimizer_sharding, activation_model)
    plans, rejected = [], []
    for mesh in mesh_factorisations(n_devices):
        grouped = impl in ("hybrid", "allgather")  # the config's ulysses_size only where it is used
        trial = replace(cfg, mesh=config_lib.MeshConfig(*mesh),
                        attention=replace(cfg.attention, impl="ring" if impl == "ulysses" else impl,
                                          ulysses_size=cfg.attention.ulysses_size if grouped else None))
        try:
            config_lib.validate(trial)
            if impl == "ulysses" and ulysses_rule(Shape.from_model_config(cfg.model), mesh[1], mesh[2]):
                raise ValueError(ulysses_rule(Shape.from_model_config(cfg.model), mesh[1], mesh[2]))
        except ValueError as e:
            rejected.append((mesh, str(e)))
            continue
        inputs = StepInputs.from_config(trial, attention=impl, remat=remat, optimizer_sharding=optimizer_sharding,
                                        activation_model=activation_model)
        plans.append(plan_step(inputs, dev))
    return plans, rejected


def best(plans: list[StepPlan]) -> StepPlan | None:
    """The fitting plan with the most tokens/s per device (ties: less memory), or None."""
    fitting = [p for p in plans if p.fits]
    return max(fitting, key=lambda p: (p.tokens_per_sec_per_device, -p.memory.total), default=None)
