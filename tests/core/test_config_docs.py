"""docs/configs.md is what scripts/make_config_docs.py writes from the config dataclasses now: adding a key
to lcjax/config.py without re-running the script fails here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("make_config_docs", ROOT / "scripts" / "make_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_md_is_up_to_date():
    script = _script()
    assert (ROOT / "docs" / "configs.md").read_text() == script.render(), \
        "docs/configs.md is out of date: run python scripts/make_config_docs.py"


def test_every_config_key_is_documented_with_its_default():
    script = _script()
    text = script.render()
    keys = script.keys()
    assert {"name", "mesh.data", "model.rope.base", "train.steps", "checkpoint.keep"} <= set(keys)
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "| `train.lr` | float | `0.001` |" in text and "| `attention.window` | int or null | `null` |" in text
