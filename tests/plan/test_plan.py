"""The analytic planner (lcjax.plan): closed forms against formulas.md's worked numbers, monotonicity,
the planner against XLA's memory analysis for the demo, and the ``lcjax plan`` CLI."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lcjax import config as config_lib
from lcjax.plan import comm, flops, memory, theory
from lcjax.plan.hardware import device
from lcjax.plan.shapes import Shape, layer_params, non_embedding_params, param_elements_per_device, total_params
from lcjax.plan.step import StepInputs, best, candidates, mesh_factorisations, plan_step

ROOT = Path(__file__).resolve().parents[2]
LLAMA2_7B = Shape(L=32, D=4096, N=32, K=32, F=11008, V=32000)
LLAMA2_13B = Shape(L=40, D=5120, N=40, K=40, F=13824, V=32000)
DEMO_TOLERANCE = 0.15  # |plan - xla| / xla for the demo step, CPU backend (docs/planner.md)


def test_parameter_counts_match_formulas_and_the_model():
    from lcjax.model.llama import count_params

    assert total_params(LLAMA2_7B) == 6_738_415_616
    assert non_embedding_params(LLAMA2_7B) == 6_607_343_616
    assert layer_params(LLAMA2_7B) == 202_383_360
    assert param_elements_per_device(LLAMA2_7B, 1) == total_params(LLAMA2_7B, LLAMA2_7B.Vp)
    for m in (config_lib.load(ROOT / "configs/demo.yaml").model,
              config_lib.load(ROOT / "configs/models/llama3_8b.yaml").model):
        assert total_params(Shape.from_model_config(m)) == count_params(m)


def test_flops_per_token():
    assert flops.flops_per_token(LLAMA2_7B, 32768, causal=False) == 91_183_669_248
    assert flops.flops_per_token(LLAMA2_7B, 32768, causal=True) == 65_413_865_472
    assert flops.flops_per_token(LLAMA2_7B, 131072, causal=False) == 245_802_491_904
    assert flops.flops_per_token(LLAMA2_7B, 131072, causal=True) == 142_723_276_800
    assert flops.hardware_flops_per_token(LLAMA2_7B, 32768, "full") > flops.hardware_flops_per_token(LLAMA2_7B, 32768)


def test_activation_bytes_per_layer():
    assert memory.layer_activation_bytes(LLAMA2_7B, 32768) == 4_311_744_512  # formulas §1.3, t = 1
    gib = lambda b: b * 32 / 2**30
    assert gib(memory.layer_activation_bytes(LLAMA2_7B, 32768, tp=8)) == pytest.approx(44.06, abs=0.01)
    assert gib(memory.layer_activation_bytes(LLAMA2_7B, 131072 // 8)) == pytest.approx(64.25, abs=0.01)
    assert theory.korthikanti_act_per_layer(32768, 1, 4096, 32) == 176_362_094_592
    assert theory.korthikanti_act_per_layer(32768, 1, 4096, 32, selective=True) == 4_563_402_752
    assert theory.korthikanti_act_per_layer(131072, 1, 4096, 32, t=8, sp=True, selective=True) == 2_281_701_376
    assert theory.korthikanti_full_recompute(32768, 1, 4096) == 268_435_456
    # lcjax's autodiff residuals (docs/planner.md): 264,344 bytes/token/layer at bf16, 2.01x §1.3
    assert memory.lcjax_layer_residual_bytes(LLAMA2_7B, 1) == 264_344
    assert memory.cast_weight_bytes(LLAMA2_7B) == 2 * (layer_params(LLAMA2_7B) - 2 * 4096)


def test_li_et_al_and_crossovers():
    assert theory.li_attn_mem(1, 32768, 4096, 128, 32, 8, "tp") == 4_529_848_320
    assert theory.li_attn_mem(1, 32768, 4096, 128, 32, 8, "sp") == 4_647_288_832
    assert theory.li_mlp_mem(1, 131072, 4096, 4, "tp") == theory.li_mlp_mem(1, 131072, 4096, 4, "sp") == 1_207_959_552
    assert theory.crossover_T(67_108_864, 4, 1, 4096) == 65536   # attention, Li: 16·AZ = 16 D
    assert theory.crossover_T(135_266_304, 4, 1, 4096) == 132096  # MLP (SwiGLU), Li: 32·H for a 4H MLP
    assert theory.crossover_T(67_108_864, 2, 1, 4096) == 32768
    assert theory.crossover_T(135_266_304, 2, 1, 4096) == 66048    # 16.125 D: "T > 16 D" reproduces
    assert theory.crossover_T(3 * 5120 * 13824, 1, 1, 5120) / 5120 == pytest.approx(8.1)  # 13B MLP, k/c = 1


def test_communication_bytes():
    assert comm.tp_bytes(LLAMA2_7B, 32768, 4) == 805_306_368
    assert comm.ulysses_bytes(LLAMA2_7B, 32768 // 4, 4) == 201_326_592
    assert comm.ring_bytes(LLAMA2_7B, 32768 // 4, 4) == (402_653_184, 1_476_395_008)
    assert comm.ring_bytes(LLAMA2_7B, 131072 // 8, 8)[0] == 1_879_048_192
    assert comm.ulysses_bytes(LLAMA2_7B, 131072 // 8, 8) == 469_762_048
    assert comm.ring_bytes(LLAMA2_7B, 1024, 1) == (0, 0)
    assert theory.ring_min_block(989e12, 450e9) == pytest.approx(2197.8, abs=0.1)
    assert theory.ring_min_block(989e12, 450e9, w=2) == pytest.approx(4395.6, abs=0.1)
    assert theory.contiguous_causal_efficiency(8) == pytest.approx(8 / 15)


@pytest.mark.parametrize("T", [32768, 131072])
@pytest.mark.parametrize("sharding", memory.OPTIMIZER_SHARDINGS)
@pytest.mark.parametrize("remat", flops.REMAT_POLICIES)
@pytest.mark.parametrize("model", memory.ACTIVATION_MODELS)
def test_memory_never_rises_when_sp_doubles(T, sharding, remat, model):
    for data in (1, 4):
        for tp in (1, 2, 8):
            totals = [plan_step(StepInputs(LLAMA2_7B, T, 4, data=data, sequence=sp, model=tp, remat=remat,
                                           optimizer_sharding=sharding, activation_model=model),
                                device("h100")).memory.total for sp in (1, 2, 4, 8, 16, 32)]
            assert all(b <= a for a, b in zip(totals, totals[1:])), (data, tp, totals)


def test_candidates_cover_every_valid_factorisation():
    cfg = config_lib.load(ROOT / "configs/models/llama2_7b.yaml", ["data.global_batch=16", "data.seq_len=32768"])
    plans, rejected = candidates(cfg, 64, device("h100"))
    assert len(plans) + len(rejected) == len(mesh_factorisations(64)) == 28
    assert all("must" in reason for _, reason in rejected)
    assert not any(p.fits for p in plans) and best(plans) is None  # f32 Adam, replicated: > 80 GB each
    assert all(p.over_by_bytes > 0 for p in plans)
    fsdp, _ = candidates(cfg, 64, device("h100"), optimizer_sharding="fsdp", remat="full")
    assert best(fsdp) is not None and best(fsdp).fits
    ulysses, rejected = candidates(cfg, 64, device("h100"), attention="ulysses")
    assert all(32 // p.inputs.model % p.inputs.sequence == 0 for p in ulysses)


def _validate_plan_module():
    spec = importlib.util.spec_from_file_location("validate_plan", ROOT / "scripts/validate_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_matches_xla_memory_for_the_demo():
    vp = _validate_plan_module()
    cfg = vp.load_config(ROOT / "configs/demo.yaml", None, (1, 4, 2))
    result = vp.compare(cfg)  # compiles the real step on the 8 simulated devices, runs nothing
    assert abs(result["relative_gap"]) < DEMO_TOLERANCE, result
    args = result["xla_parts"]["argument"]
    state = sum(result["plan_parts"][k] for k in ("params", "optimizer"))
    assert abs(args - state) / args < 0.01  # parameters + AdamW moments are the step's arguments


def _cli(*args):
    code = ("import sys; from lcjax.cli import main; rc = main(sys.argv[1:]); "
            "assert 'jax' not in sys.modules, 'plan imported jax'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_plan_json():
    out = _cli("--config", "configs/models/llama2_7b.yaml", "--seq-len", "32768", "--devices", "64",
               "--device", "h200", "--set", "data.global_batch=16", "--set", "train.dtype=bfloat16",
               "--optimizer-sharding", "fsdp", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["n_params"] == 6_738_415_616
    assert doc["flops_per_token"] == {"causal": 65_413_865_472, "palm": 91_183_669_248}
    assert len(doc["candidates"]) == 24
    for c in doc["candidates"]:
        assert set(c["mesh"]) == {"data", "sequence", "model"}
        assert set(c["memory_bytes"]) == {"params", "grads", "optimizer", "activations", "total"}
        assert {"comm_bytes_per_layer", "step_time_s", "tokens_per_sec_per_device", "mfu", "fits"} <= set(c)
        assert set(c["mfu"]) == {"causal", "palm"} and c["fits"] == (c["over_by_bytes"] == 0)
    assert sum(c["best"] for c in doc["candidates"]) == 1


def test_cli_plan_table_and_bad_input():
    table = _cli("--config", "configs/demo.yaml", "--device", "cpu")
    assert table.returncode == 0, table.stderr
    assert "1,4,2" in table.stdout and "*" in table.stdout
    for bad in (["--device", "tpu"], ["--set", "model.n_heads=7"], ["--devices", "0"], ["--remat", "some"],
                ["--seq-len", "abc"], ["--optimizer-sharding", "zero9"]):
        out = _cli("--config", "configs/demo.yaml", *bad)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stdout == "", (bad, out.stderr)


def test_tiles_shrink_the_logits_and_mlp_terms_by_their_closed_forms():
    """loss_tile keeps one tile's float32 logits and gradient (8·Vp/tp bytes a token); mlp_tile one tile's
    six F-wide tensors, and each layer then keeps no F-wide tensor at all."""
    from lcjax.plan.memory import ActivationSpec, activation_bytes, head_activation_bytes

    s = Shape.from_model_config(config_lib.load(ROOT / "configs/models/llama2_7b.yaml").model)
    tokens, tile = 8192, 2048
    whole, tiled = head_activation_bytes(s, tokens), head_activation_bytes(s, tokens, loss_tokens=tile)
    assert whole - tiled == (tokens - tile) * 8 * s.Vp
    none = activation_bytes(s, tokens, 1, ActivationSpec(remat="none"))
    mlp = activation_bytes(s, tokens, 1, ActivationSpec(remat="none", mlp_tokens=tile))
    assert none - mlp == (s.L + 1) * tokens * 2 * 6 * s.F - tile * 2 * 6 * s.F


def test_sequence_parallel_tp_in_the_plan():
    """train.sequence_parallel_tp reaches the plan: applied only with mesh.model > 1; the formulas' four
    D-wide activations ÷ tp (Korthikanti §4.2.2); the TP transfers hide under the projections, never
    more exposed time than without it; the lcjax estimate's memory unchanged (docs/planner.md)."""
    from lcjax.plan.hardware import DEVICES
    from lcjax.plan.step import sequence_tp_applies

    path = str(Path(__file__).resolve().parents[2] / "configs/experiments/llama2_7b_32k.yaml")
    cfg = config_lib.load(path, ["mesh.data=8", "mesh.sequence=4", "mesh.model=2"])
    assert sequence_tp_applies(cfg)
    assert not sequence_tp_applies(config_lib.load(path, []))
    assert not sequence_tp_applies(replace(cfg, train=replace(cfg.train, sequence_parallel_tp=False)))
    on = StepInputs.from_config(cfg)
    off = replace(on, sequence_tp=False)
    plans = {k: plan_step(v, DEVICES["h100"]) for k, v in (("on", on), ("off", off))}
    assert plans["on"].comm_exposed_s < plans["off"].comm_exposed_s
    assert plans["on"].memory.total == plans["off"].memory.total
    s, tokens = on.shape, on.tokens_per_device
    assert (memory.layer_activation_bytes(s, tokens, 2) - memory.layer_activation_bytes(s, tokens, 2, split=2)
            == 2 * tokens * 2 * s.D)


def test_layer_gradient_reduction_hides_under_the_backward():
    """The layers' gradient reduction runs in the backward's layer loop (as the trainer's in-loop sum and
    FSDP's reduce-scatters do): without ZeRO, (L−1) layers' sums are covered up to one layer's backward
    ((compute − the model's forward)/L) and the last layer's and the non-layer weights' are exposed; under
    ZeRO-2 (same all-reduce bytes, reduced after the loop) all of it is. Everything else in the step is the
    same, so the exposed time differs by exactly the hidden part; on a slow enough network nothing hides
    beyond one backward per layer."""
    from lcjax.plan.hardware import DEVICES
    from lcjax.plan.shapes import layer_matrix_elements_per_device

    base = StepInputs(shape=LLAMA2_7B, seq_len=32768, global_batch=16, data=16, sequence=4, model=1)
    s = base.shape
    layer = layer_matrix_elements_per_device(s, 1) + 2 * s.D
    rest = param_elements_per_device(s, 1) - s.L * layer
    for dev in (DEVICES["h100"], replace(DEVICES["h100"], inter_node_bw=1e6)):
        none, zero2 = (plan_step(replace(base, optimizer_sharding=o), dev) for o in ("none", "zero2"))
        assert none.compute_s == zero2.compute_s
        sync = lambda n: comm.gradient_sync_bytes(n * 4, 64, "none") / dev.bandwidth(64)
        backward = (none.compute_s - flops.flops_per_token(s, base.seq_len, causal=True) / 3
                    * base.tokens_per_device / (dev.peak(2) * dev.efficiency)) / s.L
        hidden = (s.L - 1) * min(sync(layer), backward)
        assert 0 < hidden < sync(s.L * layer)
        assert zero2.comm_exposed_s - none.comm_exposed_s == pytest.approx(hidden, rel=1e-6)
    assert hidden == pytest.approx((s.L - 1) * backward)  # the slow network: one backward per layer hidden


def test_allgather_inside_ulysses_groups_in_the_plan():
    """attention.ulysses_size with impl allgather reaches the plan: the group's all-to-alls plus a gather
    over sp/U groups of U·tokens tokens and 1/U of the kv heads (closed forms); U = sp is Ulysses alone
    (nothing gathered); the gathered K/V working set shrinks with U."""
    s, tokens, sp = LLAMA2_7B, 4096, 8
    kv = s.K * s.H
    a2a = comm.ulysses_bytes(s, tokens, 2, 1, 2)
    assert comm.grouped_allgather_bytes(s, tokens, sp, 2) == (
        a2a + 3 * 2 * 2 * tokens * kv // 2 * 2, a2a + 3 * 2 * 2 * tokens * kv // 2 * (2 + 4))
    assert comm.grouped_allgather_bytes(s, tokens, sp, sp) == (comm.ulysses_bytes(s, tokens, sp),) * 2
    assert memory.gathered_kv_bytes(s, tokens, sp, ulysses_size=sp) == 0
    working = [memory.gathered_kv_bytes(s, tokens, sp, ulysses_size=u) for u in (None, 2, 4)]
    assert working[0] > working[1] > working[2] > 0
    assert comm.layer_comm(s, tokens, sp=sp, tp=1, impl="allgather", ulysses_size=2).seq_fwd == \
        comm.grouped_allgather_bytes(s, tokens, sp, 2)[0]
    path = str(ROOT / "configs/models/llama2_7b.yaml")
    cfg = config_lib.load(path, ["mesh.data=1", "mesh.sequence=8", "mesh.model=1", "attention.impl=allgather",
                                 "attention.ulysses_size=2", "data.global_batch=1"])
    i = StepInputs.from_config(cfg)
    assert i.ulysses_size == 2 and StepInputs.from_config(cfg, attention="ring").ulysses_size is None


def test_hybrid_in_the_plan():
    """impl hybrid (Ulysses inside groups of U, ring across them) is planned, not refused: the all-to-alls
    plus the ring's terms over sp/U positions of U·tokens tokens and 1/U of the kv heads; U = sp is
    Ulysses alone; ``lcjax plan`` on a hybrid config lists meshes whose sequence size U divides."""
    s, tokens, sp = LLAMA2_7B, 4096, 8
    a2a = comm.ulysses_bytes(s, tokens, 2, 1, 2)
    kv = s.K * s.H // 2
    assert comm.hybrid_bytes(s, tokens, sp, 2) == (a2a + 3 * 2 * 2 * tokens * kv * 2,
                                                   a2a + 3 * 2 * 2 * tokens * kv * 2 + 4 * 2 * 2 * tokens * kv * 4)
    assert comm.hybrid_bytes(s, tokens, sp, sp) == (comm.ulysses_bytes(s, tokens, sp),) * 2
    with pytest.raises(ValueError, match="needs a ulysses_size dividing 8"):
        comm.layer_comm(s, tokens, sp=sp, tp=1, impl="hybrid", ulysses_size=3)
    out = subprocess.run([sys.executable, "-m", "lcjax.cli", "plan", "--config", str(ROOT / "configs/demo.yaml"),
                          "--set", "attention.impl=hybrid", "--set", "attention.ulysses_size=2", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    meshes = [tuple(c["mesh"].values()) for c in json.loads(out.stdout)["candidates"]]
    assert meshes and all(m[1] % 2 == 0 for m in meshes)
