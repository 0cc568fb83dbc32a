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


GPU_TARGETS = {"a100": "a100_sxm_80.txtpb", "h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}


def deviceless_gpus(target: str, count: int) -> list:
    """``count`` devices of a GPU described by XLA's target description, for compiling without a GPU.

    ``target``: a100 (SXM 80 GB), h100 (SXM) or h200; the descriptions (lcjax/plan/gpu_targets/, from
    XLA's own specs) drive XLA's real GPU pipeline on a CPU host. Needs the ``aot`` extra
    (jax-cuda13-plugin) and ``JAX_PLATFORMS=cpu``; the devices can build a mesh (:func:`make_mesh`) and
    compile (``jit(f).lower(*abstract).compile()``), never run. Raises ValueError for an unknown target
    and RuntimeError when the CUDA plugin is missing.
    """
    from pathlib import Path

    from jax.experimental import topologies

    if target not in GPU_TARGETS:
        raise ValueError(f"--target {target!r} must be one of {', '.join(GPU_TARGETS)}")
    spec = (Path(__file__).resolve().parents[1] / "plan" / "gpu_targets" / GPU_TARGETS[target]).read_text()
    try:
        topology = topologies.get_topology_desc("", "cuda", target_config=spec, topology=f"1x1x{count}")
    except Exception as e:  # the plugin is missing or does not load: one line
        raise RuntimeError(f"deviceless compile for {target} needs the aot extra (pip install -e '.[aot]'): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return list(topology.devices)


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
