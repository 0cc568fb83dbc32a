"""The one place that builds the device mesh (axes ``data``, ``sequence``, ``model``, in that order)."""

from __future__ import annotations

import os

AXES = ("data", "sequence", "model")


def provision_host_devices(count: int) -> None:
    """Ask XLA for ``count`` simulated CPU devices, if JAX has not started yet and no accelerator is used.

    Must run before the first ``import jax`` in the process; later it changes nothing. Does not import JAX.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags or count <= 1:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def make_mesh(data: int = 1, sequence: int = 1, model: int = 1, devices=None):
    """A ``jax.sharding.Mesh`` of shape (data, sequence, model) with Auto axis types.

    ``devices``: defaults to the first data·sequence·model devices of ``jax.devices()``.
    Raises ValueError (naming mesh.*) when there are not enough devices.
    """
    import jax
    from jax.sharding import AxisType

    count = data * sequence * model
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) < count:
        raise ValueError(
            f"mesh.data x mesh.sequence x mesh.model = {data}x{sequence}x{model} = {count} must not exceed "
            f"the {len(devices)} available {devices[0].platform} devices")
    return jax.make_mesh((data, sequence, model), AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:count])
