"""docs/integrations.md and tests/engine/ tell a new user what they need: every
counter of the vLLM connector is in the documented metric list, and the tiny
model's script says it runs with the engine's environment (.venv-vllm)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _stat_names(table: str = "STAT_NAMES") -> list[str]:
    """The keys of ``STAT_NAMES`` (or ``GAUGE_NAMES``) in embresume/integrations/vllm.py
    (read, not imported: the module needs vLLM)."""
    tree = ast.parse((ROOT / "embresume/integrations/vllm.py").read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == table:
            return [k.value for k in node.value.keys]
    raise AssertionError(f"{table} not found in embresume/integrations/vllm.py")


def _metrics_section() -> str:
    text = (ROOT / "docs/integrations.md").read_text()
    m = re.search(r"^### Metrics\n(.*?)^### ", text, re.S | re.M)
    assert m, "docs/integrations.md has no '### Metrics' section under vLLM"
    return m.group(1)


def test_every_vllm_connector_counter_is_documented():
    names = _stat_names()
    assert "items_loaded" in names
    section = _metrics_section()
    missing = [n for n in names if f"`{n}`" not in section]
    assert not missing, f"counters missing from docs/integrations.md's metric list: {missing}"


def test_every_vllm_connector_gauge_is_documented():
    names = _stat_names("GAUGE_NAMES")
    assert "pool_blocks_used" in names
    section = _metrics_section()
    missing = [n for n in names if f"`vllm:embresume_ec_{n}`" not in section]
    assert not missing, f"gauges missing from docs/integrations.md's metric list: {missing}"


def test_make_tiny_qwen2vl_says_which_environment():
    doc = ast.get_docstring(ast.parse((ROOT / "tests/engine/make_tiny_qwen2vl.py").read_text()))
    assert ".venv-vllm" in doc and "tests/engine/setup_venv.sh" in doc, doc
    text = (ROOT / "docs/integrations.md").read_text()
    mention = text[text.index("make_tiny_qwen2vl.py"):][:400]
    assert ".venv-vllm" in mention and "setup_venv.sh" in mention, mention
