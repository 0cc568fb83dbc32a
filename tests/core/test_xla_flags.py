"""lcjax's XLA GPU flags: added after the user's own, only where this XLA knows them, and switchable off."""

import os
import subprocess
import sys

from lcjax import xla_flags


def test_user_flags_win_and_unknown_flags_are_left_out():
    env = {"XLA_FLAGS": "--xla_gpu_enable_pipelined_all_gather=false --xla_force_host_platform_device_count=8"}
    known = set(xla_flags.GPU_FLAGS) - {"xla_gpu_experimental_parallel_collective_overlap_limit"}
    assert xla_flags.apply(env, known=known)
    flags = env["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_gpu_enable_pipelined_all_gather=false", "--xla_force_host_platform_device_count=8"]
    assert "--xla_gpu_enable_pipelined_all_gather=true" not in flags
    assert not any("overlap_limit" in f for f in flags)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert xla_flags.apply(env, known=set(xla_flags.GPU_FLAGS))  # a newer XLA that knows it: added then
    assert "--xla_gpu_experimental_parallel_collective_overlap_limit=4" in env["XLA_FLAGS"].split()


def test_opt_out_and_idempotent():
    env = {"LCJAX_XLA_FLAGS": "0"}
    assert not xla_flags.apply(env, known=set(xla_flags.GPU_FLAGS)) and "XLA_FLAGS" not in env
    env = {}
    assert xla_flags.apply(env, known=set(xla_flags.GPU_FLAGS))
    once = env["XLA_FLAGS"]
    assert not xla_flags.apply(env, known=set(xla_flags.GPU_FLAGS)) and env["XLA_FLAGS"] == once


def test_known_flags_reads_the_library_bytes(tmp_path):
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"\0xla_gpu_enable_pipelined_all_gather\0xla_gpu_enable_pipelined_all_gather_v2\0")
    names = ["xla_gpu_enable_pipelined_all_gather", "xla_gpu_enable_pipelined_reduce_scatter"]
    assert xla_flags.known_flags(names, [str(lib)]) == {"xla_gpu_enable_pipelined_all_gather"}
    assert xla_flags.known_flags(names, [str(tmp_path / "missing.so")]) == set()


def test_every_flag_is_known_to_the_installed_xla_and_accepted():
    """The installed XLA knows every flag (a renamed one would be dropped silently otherwise) and starts
    with all of them set (XLA aborts on an unknown flag)."""
    assert xla_flags.known_flags(list(xla_flags.GPU_FLAGS)) == set(xla_flags.GPU_FLAGS)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "import os, lcjax, jax; jax.numpy.ones(1).block_until_ready(); print(os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert all(f"--{name}=" in out for name in xla_flags.GPU_FLAGS)
