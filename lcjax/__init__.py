"""lcjax: long-context LLaMA training in JAX on sharded (data x sequence x model) meshes.

Importing the package (which every entry point does before JAX starts: the ``lcjax`` command, ``python -m
lcjax.cli``, the scripts, the tests) also keeps a CUDA plugin that is installed on a host without a GPU (the
``aot`` extra, for deviceless GPU compiles) from printing its initialisation errors (:func:`cpu_unless_gpu`),
and adds the XLA GPU flags that hide the train step's collectives under compute, after the user's own
``XLA_FLAGS`` (:mod:`lcjax.xla_flags`; ``LCJAX_XLA_FLAGS=0`` turns that off). Imports only the standard library.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

__version__ = "0.2.0"

CUDA_PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/proc/driver/nvidia/gpus/*")  # Linux driver, WSL2


def cpu_unless_gpu(environ=os.environ, *, has_gpu=None, has_cuda_plugin=None, jax_started=None) -> bool:
    """Set ``JAX_PLATFORMS=cpu`` when a CUDA plugin is installed but the host has no NVIDIA GPU; True if set.

    JAX initialises every installed plugin when ``JAX_PLATFORMS`` is unset; on a host without a GPU the CUDA
    plugin then fails (cuDNN/driver not found) and prints two tracebacks before JAX falls back to the CPU.
    With ``JAX_PLATFORMS=cpu`` the plugin still registers (deviceless GPU compiles keep working) but skips
    its hardware checks. Nothing changes when ``JAX_PLATFORMS`` is already set, JAX has already been
    imported, no CUDA plugin is installed, or a GPU device file exists (``/dev/nvidia0`` …, WSL2's
    ``/dev/dxg``). The keyword arguments replace the probes (for tests).
    """
    if "JAX_PLATFORMS" in environ:
        return False
    if jax_started if jax_started is not None else "jax" in sys.modules:
        return False
    if not (has_cuda_plugin if has_cuda_plugin is not None else _cuda_plugin_installed()):
        return False
    if has_gpu if has_gpu is not None else any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def _cuda_plugin_installed() -> bool:
    try:
        return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)
    except (ImportError, ValueError):
        return False


cpu_unless_gpu()

from lcjax import xla_flags as _xla_flags  # noqa: E402  (standard library only)

_xla_flags.apply()
