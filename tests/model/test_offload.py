"""Host offload of the remat residuals (train.offload), sequence chunking outside attention
(train.seq_chunk) and head-chunked attention (train.head_chunks): no number changes, the config rules, the
planner's host bytes, and (deviceless H100, with the ``aot`` extra) XLA's host bytes.

On the CPU backend host and device memory are one RAM: JAX stages the offload (a device_put to host memory
in the remat's forward, checked below on the jaxpr) and XLA's CPU compiler drops it, so the parity tests
compare the same arithmetic scheduled differently; the GPU placement is checked by the deviceless compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from tests.conftest import relative_error
from lcjax import config as config_lib
from lcjax import plan as plan_lib
from lcjax.model import offload
from lcjax.ops.layout import permute
from lcjax.plan import offload as plan_offload
from lcjax.sharding.mesh import make_mesh
from lcjax.train import step as step_lib
from lcjax.train.state import init_state
from tests.model.test_model import _batch, _config, _sharded_loss_and_grads
from tests.plan.test_schedule import needs_aot

ROOT = Path(__file__).resolve().parents[2]


def _assert_same(a, b, tol=1e-5):
    assert abs(a[0] - b[0]) / abs(b[0]) <= tol, (a[0], b[0])
    errors = jax.tree.map(relative_error, a[1], b[1])
    assert max(jax.tree.leaves(errors)) <= tol, errors


@pytest.fixture(scope="module")
def plain():
    """Loss and gradients on (1, 8, 1) with full remat and nothing offloaded or chunked (float32)."""
    return _sharded_loss_and_grads((1, 8, 1), "train.remat=full")


@pytest.mark.parametrize("extra", [
    ("train.remat=layer", "train.offload=layer", "train.seq_chunk=4", "train.head_chunks=2"),
    pytest.param(("train.remat=full", "train.offload=saved", "train.seq_chunk=2", "train.head_chunks=2",
                  "train.mlp_tile=2", "train.loss_tile=4"), marks=pytest.mark.slow),  # head groups unrolled
])
def test_offload_and_chunking_change_no_number(plain, extra):
    """Loss and every gradient equal (float32, ≤ 1e-5 relative) to the same step without offload and
    chunking; T/sp = 8 tokens per shard in chunks of 4 or 2, the 2 kv heads per shard in 2 groups (a loop;
    unrolled under offload=saved)."""
    _assert_same(_sharded_loss_and_grads((1, 8, 1), *extra), plain)


def test_the_offload_policy_reaches_the_program():
    """The remat forward moves the layer input to host memory (a device_put in the traced program): the
    policy is in effect, not silently ignored; without offload there is none."""
    def program(*extra):
        cfg = _config((1, 4, 2), "train.remat=layer", *extra)
        mesh = make_mesh(1, 4, 2)
        graphdef, specs, _, state = init_state(cfg, mesh, {})
        batch = {k: jax.device_put(permute(v, "zigzag", 4), step_lib.batch_sharding(mesh))
                 for k, v in _batch().items()}
        fn = step_lib.make_loss_and_grads(graphdef, specs, mesh, cfg)
        return str(jax.make_jaxpr(fn)(state.params, batch))

    assert "Host" in program("train.offload=layer")
    assert "Host" not in program()


def test_offload_policy_names():
    """The policy table: every remat policy has an offload form; unknown names raise."""
    for remat in ("layer", "full", "attention", "dots"):
        for mode in ("layer", "saved"):
            assert callable(offload.offload_policy(remat, mode))
    with pytest.raises(ValueError, match="offload"):
        offload.offload_policy("full", "none")
    assert offload.OFFLOAD_MODES == config_lib.OFFLOAD_MODES == plan_offload.OFFLOAD_MODES


@pytest.mark.parametrize("sets,message", [
    (["train.offload=disk"], "train.offload 'disk' must be one of none, layer, saved"),
    (["train.offload=layer"], "train.offload 'layer' moves the residuals a remat policy saves"),
    (["train.remat=full", "train.seq_chunk=3"], "train.seq_chunk 3 must be 0"),
    (["train.head_chunks=3"], "train.head_chunks 3 must be >= 1 and divide the kv heads"),
    (["train.head_chunks=2", "attention.impl=ulysses"], "train.head_chunks 2 needs attention.impl ring"),
])
def test_bad_memory_settings_name_the_key(sets, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load(None, ["mesh.sequence=4", "data.seq_len=64", *sets])


def test_planner_host_bytes_and_pcie_time_for_the_4m_config():
    """Llama-3-8B at 4,194,304 tokens on 8 H100s, layer inputs offloaded: L·(T/sp)·D·2 bytes on the host
    (XLA's deviceless figure is the same 137.44 GB, docs/memory.md), 4.29 GB per layer each way, hidden
    under a layer's forward at the preset's PCIe bandwidth."""
    cfg = config_lib.load(ROOT / "configs/experiments/llama3_8b_4m.yaml")
    p = plan_lib.plan_step(plan_lib.StepInputs.from_config(cfg), plan_lib.device("h100"))
    off = p.offload
    assert off.bytes_per_layer == 524_288 * 4096 * 2
    assert off.host_bytes == 32 * off.bytes_per_layer == 137_438_953_472
    assert off.hidden and off.transfer_s_per_layer < off.layer_forward_s < off.layer_backward_s
    none = plan_lib.plan_step(plan_lib.StepInputs.from_config(cfg, offload="none"), plan_lib.device("h100"))
    assert none.offload.host_bytes == 0
    assert p.memory.activations == none.memory.activations - off.device_bytes_saved


@needs_aot
@pytest.mark.slow  # two deviceless compiles, ~45 s on 2 cores
def test_deviceless_h100_compile_puts_the_layer_inputs_in_host_memory():
    """The demo model (2 layers, T = 1024 on 1x4x2 H100 targets, bf16): with train.offload=layer XLA's
    host bytes are exactly L·(T/sp)·D·2 and the device bytes fall (by about one layer's input: two leave,
    the copy buffer stays)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)

    def run(*sets):
        args = [sys.executable, str(ROOT / "scripts/validate_plan.py"), "--config", str(ROOT / "configs/demo.yaml"),
                "--seq-len", "1024", "--mesh", "1,4,2", "--target", "h100", "--json", "--set", "model.n_layers=2",
                "--set", "train.dtype=bfloat16", "--set", "train.remat=layer", *(a for s in sets for a in ("--set", s))]
        out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    on, off = run("train.offload=layer"), run()
    per_layer = 1024 // 4 * 256 * 2
    assert on["host_bytes_per_device"] == 2 * per_layer and off["host_bytes_per_device"] == 0
    assert on["xla_bytes_per_device"] <= off["xla_bytes_per_device"] - per_layer // 2
    assert on["plan_host_bytes_per_device"] == on["host_bytes_per_device"]


def test_gpu_allocator_fraction_is_set_unless_the_user_chose():
    from lcjax import memcheck

    assert memcheck.configure_gpu_allocator(env := {}) == "0.95" and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    assert memcheck.configure_gpu_allocator({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}) == "0.5"
    assert memcheck.configure_gpu_allocator(env := {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}) == ""
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
