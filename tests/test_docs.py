"""The configuration shown in the README is a valid config (docs that rot mislead users first)."""

from __future__ import annotations

import re
from pathlib import Path

from metergate.config import parse_config

ROOT = Path(__file__).parent.parent


def test_readme_config_reference_parses() -> None:
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.lstrip().startswith("server:"))
    config = parse_config(block, source="README.md")
    assert {"openai", "anthropic", "gemini", "groq", "vllm", "azure"} <= set(config.providers)
    assert config.ledger is not None and config.budgets
