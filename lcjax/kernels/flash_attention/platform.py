"""Which devices a kernel is being compiled for, decided from the program's devices, not the host.

A deviceless compile for a GPU target (``lcjax.sharding.mesh.deviceless_gpus``) runs under
``JAX_PLATFORMS=cpu``, where ``jax.default_backend()`` is ``cpu``; deciding Pallas's ``interpret`` from it
would compile the interpreter instead of the kernel. Inside a ``shard_map`` the abstract mesh knows the
devices of the program (platform and device kind); outside one the default backend is all there is.
"""

from __future__ import annotations

import jax


def target_device():
    """(platform, device_kind) of the devices the current trace is compiled for.

    platform is "gpu", "cpu" or "tpu"; device_kind the device's name ("NVIDIA H100 80GB HBM3") or None
    when unknown. Inside ``shard_map`` (or ``jax.set_mesh``) it comes from the abstract mesh; otherwise
    from ``jax.default_backend()`` and its first device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return device.platform, getattr(device, "device_kind", None)
    backend = jax.default_backend()
    kind = jax.devices()[0].device_kind if backend != "cpu" else None
    return ("gpu" if backend in ("cuda", "rocm", "gpu") else backend), kind


def resolve_interpret(interpret) -> bool:
    """``interpret`` as given, or (None) True exactly when the program's devices are not GPUs."""
    return target_device()[0] != "gpu" if interpret is None else bool(interpret)
