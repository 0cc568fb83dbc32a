"""The import layering of docs/design.md: a module imports only from layers above it in the list."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lcjax"
ORDER = ["xla_flags", "rundir", "memcheck", "config", "ops", "kernels", "parallel", "sharding", "attention", "model", "data", "checkpoint",
         "distributed", "generate", "plan", "eval", "train", "convert", "checkpoints_cli", "cli"]
NEVER = {"ops": {"config"}, "kernels": {"config"}, "parallel": {"config"}, "eval": {"train"},
         "plan": {"ops", "kernels", "parallel", "sharding", "attention", "model", "data", "checkpoint"}}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_layers_import_only_upwards():
    problems = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        layer = _layer(".".join(rel.parts).removesuffix(".__init__"))
        if layer == "__init__":
            continue
        assert layer in ORDER, f"{path}: layer {layer} is not in docs/design.md's list"
        for name in _imports(path):
            if not name.startswith("lcjax."):
                continue
            target = _layer(name)
            if target == layer:
                continue
            if ORDER.index(target) > ORDER.index(layer) or target in NEVER.get(layer, ()):
                problems.append(f"{rel}: imports {name}")
    assert not problems, problems


def test_plan_and_config_do_not_import_jax():
    for path in [ROOT / "config.py", *(ROOT / "plan").rglob("*.py")]:
        assert not any(n == "jax" or n.startswith("jax.") for n in _imports(path)), path
