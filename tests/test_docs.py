"""The configurations shown in the README and shipped in deploy/ work (docs that rot mislead users first)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import openai

from metergate.config import parse_config
from metergate.simulator import DEFAULT_KEYS, SimulatorThread, free_port
from tests.conftest import Gateway, Metrics, assert_metered, wait_for

ROOT = Path(__file__).parent.parent


def test_readme_config_reference_parses() -> None:
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.lstrip().startswith("server:"))
    config = parse_config(block, source="README.md")
    assert {"openai", "anthropic", "gemini", "groq", "vllm", "azure"} <= set(config.providers)
    assert config.ledger is not None and config.budgets


def test_example_config_serves_and_meters(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    """deploy/metergate.yaml, its providers pointed at the simulator: its example keys work and are attributed."""
    text = (ROOT / "deploy" / "metergate.yaml").read_text()
    for url in ("https://api.openai.com", "https://api.anthropic.com", "https://generativelanguage.googleapis.com"):
        text = text.replace(f'"{url}"', f'"{simulator.url}"')
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    text = text.replace('"127.0.0.1:8080"', f'"{listen}"').replace('"127.0.0.1:9102"', f'"{metrics}"')
    text = text.replace('"sqlite:///metergate.db"', f'"sqlite:///{tmp_path}/metergate.db"')  # not in the checkout
    config = tmp_path / "metergate.yaml"
    config.write_text(text)
    env = {
        **os.environ,
        "OPENAI_API_KEY": DEFAULT_KEYS["openai"],
        "ANTHROPIC_API_KEY": DEFAULT_KEYS["anthropic"],
        "GEMINI_API_KEY": DEFAULT_KEYS["gemini"],
    }
    gw = Gateway(config, env, listen, metrics, log_path=tmp_path / "gw.log")
    gw.start()
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="mg-example-search-ranker", max_retries=0)
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-sim-tag": tag}
        )
        assert wait_for(lambda: gw.metrics().sum("llm_requests_total", team="search", app="ranker") == 1)
        assert_metered(gw, Metrics({}), simulator.app.billed(tag), "gpt-4o-mini", team="search", app="ranker")
    finally:
        gw.stop()
