"""The ``lcjax plan`` output: a JSON document and a text table of candidate meshes."""

from __future__ import annotations

from lcjax.plan import memory
from lcjax.plan.shapes import Shape, total_params
from lcjax.plan.step import StepPlan, best, model_flops

GB = 10**9


def candidate_dict(p: StepPlan, is_best: bool) -> dict:
    """One candidate as JSON: mesh, memory_bytes, comm_bytes_per_layer, time, tokens/s, mfu, fits."""
    i = p.inputs
    return {
        "mesh": {"data": i.data, "sequence": i.sequence, "model": i.model},
        "memory_bytes": p.memory.as_dict(),
        "host_bytes": p.offload.host_bytes if p.offload else 0,
        "offload": p.offload.as_dict() if p.offload else None,
        "activation_bytes_per_layer": layer_activations(p),
        "comm_bytes_per_layer": p.layer_comm.as_dict(),
        "comm_bytes_per_step_outside_layers": p.step_comm_bytes,
        "compute_s": p.compute_s,
        "comm_exposed_s": p.comm_exposed_s,
        "step_time_s": p.step_time_s,
        "tokens_per_sec_per_device": p.tokens_per_sec_per_device,
        "mfu": p.mfu,
        "fits": p.fits,
        "over_by_bytes": p.over_by_bytes,
        "best": is_best,
    }


def layer_activations(p: StepPlan) -> dict:
    """One layer's activation bytes on one device by both estimates (lcjax.plan.memory)."""
    i, tokens = p.inputs, p.inputs.tokens_per_device
    stored = i.stored_bytes or i.compute_bytes
    return {"formulas_1_3": memory.layer_activation_bytes(i.shape, tokens, i.model, stored),
            "lcjax": memory.lcjax_layer_residual_bytes(i.shape, tokens, i.model, i.compute_bytes, stored)
            + memory.cast_weight_bytes(i.shape, i.model, i.compute_bytes, i.param_bytes, stored)}


def to_json(shape: Shape, seq_len: int, plans: list[StepPlan], rejected, settings: dict) -> dict:
    """The whole ``--json`` document: n_params, flops_per_token, settings, candidates, rejected."""
    chosen = best(plans)
    return {
        "n_params": total_params(shape),
        "flops_per_token": model_flops(shape, seq_len),
        **settings,
        "candidates": [candidate_dict(p, p is chosen) for p in plans],
        "rejected": [{"mesh": dict(zip(("data", "sequence", "model"), m)), "reason": r} for m, r in rejected],
    }


def table(shape: Shape, seq_len: int, plans: list[StepPlan], rejected, settings: dict) -> str:
    """Human-readable table; '*' marks the best mesh that fits."""
    chosen = best(plans)
    f = model_flops(shape, seq_len)
    lines = [f"model: {total_params(shape):,} parameters; FLOPs/token at T={seq_len}: "
             f"{f['causal']:.4g} causal, {f['palm']:.4g} PaLM",
             "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
             f"{'':1} {'data,seq,model':>14} {'state GB':>9} {'act GB':>8} {'total GB':>9} {'comm/layer MB':>13} "
             f"{'step s':>9} {'exposed s':>9} {'tok/s/dev':>10} {'MFU c/PaLM':>11}  fits"]
    for p in plans:
        i, m = p.inputs, p.memory
        mesh = f"{i.data},{i.sequence},{i.model}"
        fit = "yes" if p.fits else f"no, over by {p.over_by_bytes / GB:.1f} GB"
        lines.append(f"{'*' if p is chosen else ' '} {mesh:>14} {(m.params + m.grads + m.optimizer) / GB:9.2f} "
                     f"{m.activations / GB:8.2f} {m.total / GB:9.2f} {p.layer_comm.total / 1e6:13.1f} "
                     f"{p.step_time_s:#9.4g} {p.comm_exposed_s:#9.3g} {p.tokens_per_sec_per_device:10.1f} "
                     f"{p.mfu['causal']:5.2f}/{p.mfu['palm']:.2f}  {fit}")
    if rejected:
        lines.append(f"{len(rejected)} meshes rejected by the config rules, e.g. "
                     f"{','.join(map(str, rejected[0][0]))}: {rejected[0][1]}")
    lines.append("estimates (docs/planner.md); GB = 1e9 bytes; '*' = most tokens/s among meshes that fit"
                 if chosen else "no mesh fits: try --optimizer-sharding, --remat full or more devices")
    return "\n".join(lines)
