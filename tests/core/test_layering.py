"""The import layering of docs/design.md ("Layout of the repository"): a module imports only from layers
above it in the list, and never across the forbidden directions the design names. Every import form
counts: ``import lcjax.x``, ``from lcjax.x import y``, ``from lcjax import x``, relative imports, and
imports inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "lcjax"
DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
ORDER = ["choices", "xla_flags", "rundir", "memcheck", "config", "ops", "kernels", "parallel", "sharding", "attention",
         "model", "data", "checkpoint", "distributed", "generate", "plan", "eval", "train", "convert", "checkpoints_cli", "cli"]
JAX_LAYERS = {"ops", "kernels", "parallel", "sharding", "attention", "model", "data", "checkpoint", "generate"}
# docs/design.md, "Forbidden directions besides 'upwards only'"
NEVER = {"choices": set(ORDER), "xla_flags": set(ORDER), "config": set(ORDER) - {"choices"},
         "ops": {"config"}, "kernels": {"config"}, "parallel": {"config"}, "eval": {"train"}, "plan": JAX_LAYERS}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, source: str | None = None):
    """Every module ``path`` imports (absolute names), whatever the import form; ``source`` replaces the
    file's text."""
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from lcjax import x`` / ``from lcjax.pkg import mod``: the names may be modules themselves
            yield from (f"{base}.{a.name}" if base == "lcjax" else base for a in node.names)


def _problems(path: Path, source: str | None = None) -> list[str]:
    layer = _layer(_module_of(path))
    out = []
    for name in _imports(path, source):
        if not name.startswith("lcjax.") or _layer(name) == layer:
            continue
        target = _layer(name)
        if target not in ORDER:
            out.append(f"{_module_of(path)}: imports {name}, a layer docs/design.md does not list")
        elif ORDER.index(target) > ORDER.index(layer) or target in NEVER.get(layer, ()):
            out.append(f"{_module_of(path)}: imports {name}")
    return out


def test_layers_import_only_upwards():
    problems = []
    for path in ROOT.rglob("*.py"):
        layer = _layer(_module_of(path))
        if layer == "__init__":
            continue
        assert layer in ORDER, f"{path}: layer {layer} is not in docs/design.md's list"
        problems += _problems(path)
    assert not problems, problems


def test_every_layer_is_in_the_design():
    listed = DESIGN.read_text().split("## Layout of the repository")[1].split("```")[1]
    for layer in ORDER:
        assert f"  {layer}" in listed, f"layer {layer} is missing from docs/design.md's repository layout"


@pytest.mark.parametrize("source, bad", [
    ("from lcjax import train\n", True), ("from lcjax.train import loop\n", True), ("import lcjax.train.step\n", True),
    ("from ..train import step\n", True), ("def f():\n    from lcjax import train\n", True),
    ("from lcjax import generate\n", False), ("from lcjax.model.llama import Llama\n", False)])
def test_the_walk_sees_every_import_form(source, bad):
    """Negative control: an eval module importing train in each form is caught; allowed imports are not."""
    probe = ROOT / "eval" / "probe.py"  # never written: its text is ``source``
    assert bool(_problems(probe, source)) == bad, (source, _problems(probe, source))


def test_plan_choices_and_config_do_not_import_jax():
    for path in [ROOT / "config.py", ROOT / "choices.py", *(ROOT / "plan").rglob("*.py")]:
        if path.exists():
            assert not any(n == "jax" or n.startswith("jax.") for n in _imports(path)), path
