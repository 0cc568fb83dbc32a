"""Every test runs with 8 simulated CPU devices: XLA_FLAGS must be set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert len(jax.devices()) == 8, "tests need 8 simulated devices; JAX was imported before conftest"


def relative_error(a, b) -> float:
    """max|a − b| / max|b| (docs/design.md, "Numbers")."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
