"""Device presets: peak dense FLOP/s per compute dtype, memory, and per-direction link bandwidths.

Peaks are the vendors' dense (no sparsity) tensor-core figures; float32 matmuls are taken at TF32 rate
(XLA's default precision on Ampere and newer). Links: NVLink within a node of ``per_node`` devices,
InfiniBand (one NIC per GPU) between nodes, both per direction; ``host_bw`` the GPU's PCIe link to host
memory per direction (the vendor's PCIe generation × 16 lanes: Gen4 32 GB/s, Gen5 64 GB/s), what remat
offload (train.offload) moves over. ``efficiency`` is an *assumption*: the
share of peak the step's matmuls and attention reach when nothing waits on communication (0.5 is typical
of well-tuned LLM training; pass another with ``--efficiency``). CPU figures are rough and describe the
simulated host devices, which share the host's cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 2**30


@dataclass(frozen=True)
class Device:
    """A device preset: dense peak FLOP/s per dtype, memory (bytes), link bandwidth per direction
    (bytes/s) inside and across nodes, devices per node, and the share of peak assumed reachable."""

    name: str
    peak_bf16: float       # FLOP/s
    peak_f32: float        # FLOP/s
    memory_bytes: int
    intra_node_bw: float   # bytes/s per direction
    inter_node_bw: float   # bytes/s per direction
    per_node: int = 8
    efficiency: float = 0.5
    host_bw: float = 64e9  # bytes/s per direction, device <-> pinned host memory

    def peak(self, compute_bytes: int) -> float:
        """Peak FLOP/s for a compute dtype of ``compute_bytes`` (2: bfloat16, 4: float32)."""
        return self.peak_bf16 if compute_bytes == 2 else self.peak_f32

    def bandwidth(self, span: int) -> float:
        """Per-direction bandwidth of a collective whose devices span ``span`` consecutive device ids."""
        return self.intra_node_bw if span <= self.per_node else self.inter_node_bw


DEVICES = {
    # A100 SXM 80GB: 312 TF bf16, 156 TF TF32; NVLink3 600 GB/s bidirectional; IB HDR 200 Gb/s per GPU.
    "a100": Device("a100", 312e12, 156e12, 80 * GiB, 300e9, 25e9, host_bw=32e9),  # PCIe Gen4 x16
    # H100 SXM 80GB: 989 TF bf16, 494 TF TF32; NVLink4 900 GB/s bidirectional; IB NDR 400 Gb/s per GPU.
    "h100": Device("h100", 989e12, 494e12, 80 * GiB, 450e9, 50e9, host_bw=64e9),  # PCIe Gen5 x16
    # H200 SXM 141GB: H100 compute, 141 GB HBM3e.
    "h200": Device("h200", 989e12, 494e12, 141 * 10**9, 450e9, 50e9, host_bw=64e9),
    # H800 SXM 80GB: H100 compute, NVLink 400 GB/s bidirectional.
    "h800": Device("h800", 989e12, 494e12, 80 * GiB, 200e9, 50e9),
    # One simulated CPU device (rough: a few cores' SIMD, host memcpy as the "link").
    "cpu": Device("cpu", 1e11, 1e11, 64 * 10**9, 1e10, 1e10, per_node=10**9, efficiency=1.0, host_bw=1e10),
}


def device(name: str, efficiency: float | None = None) -> Device:
    """The preset ``name`` (a100, h100, h200, h800, cpu), optionally with another ``efficiency``."""
    if name not in DEVICES:
        raise ValueError(f"--device {name!r} must be one of {', '.join(DEVICES)}")
    d = DEVICES[name]
    if efficiency is not None:
        if not 0 < efficiency <= 1:
            raise ValueError(f"--efficiency {efficiency} must be in (0, 1]")
        d = replace(d, efficiency=efficiency)
    return d
