"""Multi-process (multi-host) runs: one JAX process per host, all running the same ``lcjax train`` command.

Where the settings come from, first match wins (docs/multihost.md):
1. the flags ``--coordinator HOST:PORT --num-processes N --process-id I``;
2. the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
3. SLURM (``SLURM_JOB_ID`` set and ``SLURM_NTASKS`` > 1): JAX's own cluster detection reads the node list,
   task count and rank, one task per host;
4. otherwise a single-process run (nothing is initialised).

On CPU the collectives between processes use gloo (JAX's default there). Nothing here runs at import time;
:func:`resolve` is pure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclass(frozen=True)
class Settings:
    """How to call ``jax.distributed.initialize``; ``cluster`` is "slurm" when JAX detects everything."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int = 300
    cluster: str | None = None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            *, timeout_s: int = 300, environ: Mapping[str, str] = os.environ) -> Settings | None:
    """The multi-process settings from flags, else the environment, else SLURM; None for one process.

    Raises ValueError (one line naming the flag or variable) for a malformed address, a missing or
    non-integer count or id, an id outside [0, N), or a timeout below 1.
    """
    if timeout_s < 1:
        raise ValueError(f"--init-timeout {timeout_s} must be >= 1 (seconds)")
    flags = (coordinator, num_processes, process_id)
    if any(v is not None for v in flags):
        names = ("--coordinator", "--num-processes", "--process-id")
    elif any(ENV[k] in environ for k in ENV):
        names = tuple(ENV.values())
        flags = tuple(environ.get(n) for n in names)
    elif "SLURM_JOB_ID" in environ and _int(environ.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        return Settings(None, None, None, timeout_s, cluster="slurm")
    else:
        return None
    for name, value in zip(names, flags):
        if value is None or str(value).strip() == "":
            raise ValueError(f"{name} is needed too: a multi-process run sets {', '.join(names)}")
    address, count, rank = str(flags[0]), _int(flags[1], names[1]), _int(flags[2], names[2])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{names[0]} {address!r} must have the form HOST:PORT")
    if count < 1:
        raise ValueError(f"{names[1]} {count} must be >= 1")
    if not 0 <= rank < count:
        raise ValueError(f"{names[2]} {rank} must be in [0, {count}) ({names[1]} = {count})")
    return None if count == 1 else Settings(address, count, rank, timeout_s)


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} must be an integer") from None


def local_device_count(total: int, settings: Settings | None) -> int:
    """Devices each process provides for a mesh of ``total`` devices (what simulated CPU hosts need).

    Raises ValueError when ``total`` is not divisible by the number of processes."""
    n = settings.num_processes if settings and settings.num_processes else 1
    if total % n:
        raise ValueError(f"mesh.data x mesh.sequence x mesh.model = {total} must be divisible by the "
                         f"{n} processes")
    return total // n


def initialize(settings: Settings | None) -> None:
    """Start ``jax.distributed`` (blocks until every process has joined or the timeout passes).

    Raises ValueError (one line naming the coordinator) when they do not all join in time."""
    if settings is None:
        return
    import jax

    try:
        if settings.cluster:
            jax.distributed.initialize(initialization_timeout=settings.timeout_s)
        else:
            jax.distributed.initialize(coordinator_address=settings.coordinator,
                                       num_processes=settings.num_processes, process_id=settings.process_id,
                                       initialization_timeout=settings.timeout_s)
    except Exception as e:  # JAX raises RuntimeError/XlaRuntimeError with a long message
        where = settings.coordinator or settings.cluster
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"--coordinator {where}: the {settings.num_processes or 'cluster'} processes did not all "
                         f"join within --init-timeout {settings.timeout_s} s ({detail})") from None


def is_primary() -> bool:
    """True in the process that writes the run directory's files (process 0)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to wait for with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True in any process (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
