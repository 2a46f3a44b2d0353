"""The process: startup refusals, the metrics listener, graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import KEYS, Gateway, make_gateway, wait_for


def test_bad_config_stops_startup_naming_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.yaml"
    path.write_text(
        "providers:\n  openai: {type: openai, base_url: 'http://x', api_key_env: K}\n"
        "routes:\n  - {model: 'gpt-*', provider: opeanai}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "metergate", "serve", "--config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "routes.0.provider" in proc.stderr and "bad.yaml:4" in proc.stderr and "opeanai" in proc.stderr


def test_missing_provider_secret_stops_startup(tmp_path, simulator) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(tmp_path, simulator.url)
    gw.env.pop("SIM_OPENAI_KEY")
    proc = subprocess.run(
        [sys.executable, "-m", "metergate", "serve", "--config", str(gw.config_path)],
        env=gw.env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "SIM_OPENAI_KEY" in proc.stderr


def test_port_in_use_is_reported(tmp_path, gateway: Gateway, simulator) -> None:  # type: ignore[no-untyped-def]
    clash = make_gateway(tmp_path, simulator.url)
    text = clash.config_path.read_text().replace(clash.listen, gateway.listen)
    clash.config_path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "metergate", "serve", "--config", str(clash.config_path)],
        env=clash.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "cannot listen" in proc.stderr


def test_exposition_passes_promtool_and_names_the_seed_metrics(gateway: Gateway, simulator, tag: str) -> None:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1",
        api_key=KEYS["search/ranker"],
        max_retries=0,
        default_headers={"x-sim-tag": tag},
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):  # and one error, so llm_errors_total has a series
        client.chat.completions.create(
            model="gpt-unknown-x",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-sim-fail": "status:404"},
        )
    text = httpx.get(gateway.metrics_url).text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in (
        "llm_tokens_in",
        "llm_tokens_out",
        "llm_total_cost_usd",
        "llm_requests_total",
        "llm_errors_total",
        "llm_latency_seconds_bucket",
    ):
        assert f"\n{name}{{" in text
    labels = (
        'app="ranker"',
        'code="200"',
        'endpoint="/v1/chat/completions"',
        'model="gpt-4o-mini"',
        'provider="openai"',
        'team="search"',
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("llm_tokens_in{") and 'team="search"' in ln)
    assert all(label in line for label in labels)
    assert 'le="300.0"' in text  # latency buckets reach 300 s


def test_health_and_readiness(gateway: Gateway) -> None:
    base = f"http://{gateway.metrics_listen}"
    assert httpx.get(f"{base}/healthz").text == "ok\n"
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/nope").status_code == 404


def test_sigterm_drains_in_flight_streams(tmp_path, simulator, tag: str) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(tmp_path, simulator.url, server_extra=", shutdown_timeout_s: 20").start()
    client = openai.OpenAI(
        base_url=f"{gw.url}/v1",
        api_key=KEYS["ads/bidder"],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-chunks": "20", "x-sim-chunk-delay-ms": "50"},
    )
    results: list[int] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
                )
            )
            results.append(len(chunks))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(simulator.app.billed(tag)) == 3)
    time.sleep(0.2)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    # While draining: not ready, no new connections.
    assert wait_for(lambda: _readyz(gw) == 503, timeout=5)
    for t in threads:
        t.join(timeout=30)
    assert not errors and results == [
        22,
        22,
        22,
    ]  # role chunk + 20 content chunks + finish chunk, each complete
    assert gw.proc.wait(timeout=30) == 0
    assert "draining 3 in-flight requests" in gw.log()


def _readyz(gw: Gateway) -> int:
    try:
        return httpx.get(f"http://{gw.metrics_listen}/readyz", timeout=1).status_code
    except httpx.HTTPError:
        return -1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_idle_gateway_exits_cleanly(tmp_path, simulator, sig: int) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(tmp_path, simulator.url).start()
    assert gw.stop(sig) == 0
