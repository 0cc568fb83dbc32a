"""Analytic planner: per-device memory, communication, FLOPs and time of one lcjax training step.

Pure Python; imports no JAX (tests/core/test_layering.py). Formulas, sources and worked numbers:
docs/reference/formulas.md; the documented checks and the XLA validation: docs/planner.md.

Modules: ``shapes`` (parameter counts), ``memory`` (bytes per device), ``flops`` (FLOPs per token),
``comm`` (bytes per layer), ``hardware`` (device presets), ``step`` (the step model and candidate meshes),
``theory`` (the papers' closed forms), ``report`` (CLI output).
"""

from lcjax.plan.hardware import DEVICES, Device, device
from lcjax.plan.shapes import Shape, total_params
from lcjax.plan.step import StepInputs, StepPlan, best, candidates, plan_step

__all__ = ["DEVICES", "Device", "Shape", "StepInputs", "StepPlan", "best", "candidates", "device", "plan_step",
           "total_params"]
