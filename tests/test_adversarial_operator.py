"""Operator mistakes: every one gets a clear message naming what is wrong, exit status 1, and no traceback.

Before issue 8, `limit_usd: .inf` and `ledger.url: "sqlite:////"` passed check-config and then crashed serve,
a YAML value nested 5,000 deep crashed both, and `demo` accepted or crashed on bad options.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from metergate.simulator import free_port

BASE = """\
providers:
  p: {type: openai-compatible, base_url: "http://127.0.0.1:1"}
routes: [{model: "*", provider: p}]
keys: [{sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", team: t, app: a}]
"""


def metergate(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metergate", *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def alias_bomb() -> str:
    lines = ["x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    return "\n".join(lines) + "\n"


MISTAKES = {
    "infinite budget": ("budgets: [{team: t, period: day, limit_usd: .inf, action: block}]\n", "limit_usd"),
    "nan budget": ("budgets: [{team: t, period: day, limit_usd: .nan, action: block}]\n", "limit_usd"),
    "infinite timeout": ("server: {upstream_timeout_s: .inf}\n", "upstream_timeout_s"),
    "sqlite root": ('ledger: {url: "sqlite:////"}\n', "ledger.url"),
    "sqlite nothing": ('ledger: {url: "sqlite:///"}\n', "ledger.url"),
    "sqlite directory": ('ledger: {url: "sqlite:///var/lib/"}\n', "ledger.url"),
    "spool directory": ('ledger: {url: "sqlite:///x.db", spool_path: "/tmp/"}\n', "spool_path"),
    "nested 5000 deep": ("teams: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "nested 100 deep": ("teams: " + "[" * 100 + "]" * 100 + "\n", "nested too deeply"),
    "alias bomb": (alias_bomb(), "YAML aliases"),
    "huge header limit": ("server: {max_header_bytes: 99999999999}\n", "max_header_bytes"),
}


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_config_mistakes_are_one_clear_error(tmp_path: Path, command: str, mistake: str) -> None:
    extra, named = MISTAKES[mistake]
    (tmp_path / "gw.yaml").write_text(BASE + extra)
    args = ["check-config", "gw.yaml"] if command == "check-config" else ["serve", "--config", "gw.yaml"]
    result = metergate(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert named in result.stderr
    assert len(result.stderr.splitlines()) <= 3, result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--listen", "bad"], "--listen"),
        (["--metrics-listen", "nowhere:"], "--metrics-listen"),
        (["--listen", "127.0.0.1:9102"], "must differ"),
        (["--duration", "-5"], "--duration"),
        (["--rate", "-1"], "--rate"),
        (["--rate", "0"], "--rate"),
        (["--rate", "nan"], "--rate"),
    ],
)
def test_demo_option_mistakes_are_one_clear_error(tmp_path: Path, args: list[str], named: str) -> None:
    result = metergate("demo", *args, cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert named in result.stderr and len(result.stderr.splitlines()) <= 3, result.stderr


def test_unknown_log_level(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(BASE)
    result = metergate("serve", "--config", "gw.yaml", "--log-level", "loud", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "log level" in result.stderr


def test_a_ledger_that_cannot_be_created_is_reported_and_traffic_flows(tmp_path: Path) -> None:
    """An unusable ledger location is an error in the log and metergate_ledger_up 0, never a crash."""
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    (tmp_path / "gw.yaml").write_text(
        BASE
        + f'server: {{listen: "{listen}", metrics_listen: "{metrics}", shutdown_timeout_s: 1}}\n'
        + 'ledger: {url: "sqlite:////proc/no-such-dir/ledger.db"}\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "metergate", "serve", "--config", "gw.yaml"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        up = None
        for _ in range(100):
            try:
                text = httpx.get(f"http://{metrics}/metrics", timeout=1).text
                up = next(line for line in text.splitlines() if line.startswith("metergate_ledger_up "))
                break
            except (httpx.HTTPError, StopIteration):
                time.sleep(0.1)
        assert up == "metergate_ledger_up 0.0"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err and "/proc/no-such-dir" in err


@pytest.mark.parametrize(
    ("base_url", "named"),
    [("http://127.0.0.1:99999", "Port out of range"), ("http://[::1", "IPv6"), ("http://h/v1?x=1", "query")],
)
def test_an_unusable_base_url_is_refused_by_check_config(tmp_path: Path, base_url: str, named: str) -> None:
    """It used to pass check-config and make every request a 500 with a traceback."""
    (tmp_path / "gw.yaml").write_text(
        f'providers:\n  p: {{type: openai-compatible, base_url: "{base_url}"}}\nroutes: [{{model: "*", provider: p}}]\n'
    )
    result = metergate("check-config", "gw.yaml", cwd=tmp_path)
    assert result.returncode == 1 and named in result.stderr and "Traceback" not in result.stderr
