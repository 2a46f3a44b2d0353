"""The shipped Prometheus, Alertmanager and Kubernetes files, checked with the real tools.

promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` (`make system-deps`). These tests
never skip: without the tools they fail and say what to install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import system_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
K8S = DEPLOY / "kubernetes"
README = DEPLOY / "README.md"

SEVERITIES = {"page", "ticket", "info"}
REQUIRED_ALERTS = {
    "LLMTeamCostSpike",
    "LLMTeamTokenSpike",
    "LLMDailyBudgetExceeded",
    "LLMDailyBudgetWarning",
    "LLMMonthlyBudgetForecastExceeded",
    "LLMGatewayTargetDown",
    "LLMMetricsAbsent",
    "LLMProviderErrorRatioHigh",
    "LLMUpstreamRateLimited",
    "LLMLatencyP95High",
    "LLMUnpricedModelTraffic",
    "LLMLedgerDown",
    "LLMLedgerRecordsLost",
    "LLMRateLimitsNotShared",
    "LLMLedgerRecordsRejected",
    "LLMUnmeteredTraffic",
    "LLMReconciliationGap",
}
# The recording rules of the metrics contract, exactly: dashboards and alerts share these names.
CONTRACT_RECORDING_RULES = {
    "team_app_model:llm_tokens_in:rate5m",
    "team_app_model:llm_tokens_out:rate5m",
    "team_app_model:llm_cost_usd:rate5m",
    "team_app:llm_cost_usd:increase1h",
    "team_app:llm_cost_usd:increase1d",
    "team_app:llm_tokens:increase1h",
    "team_app:llm_tokens:increase1d",
    "team:llm_cost_usd:rate5m",
    "team:llm_cost_usd:rate1h",
    "team:llm_tokens:rate5m",
    "team:llm_tokens:rate1h",
    "provider_team:llm_errors:ratio_rate5m",
    "provider:llm_upstream_429:rate5m",
    "provider_model:llm_latency_seconds:p95_5m",
    "model:llm_unpriced_requests:rate5m",
}


# --- helpers ----------------------------------------------------------------------------------------------------


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=240, check=False)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}\n{result.stderr}"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in RULES:
        groups.extend(load(path)["groups"])
    return groups


@cache
def alerts() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for group in rule_groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in found, f"alert {rule['alert']} defined twice"
                found[rule["alert"]] = rule
    return found


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings, plus explicit <a id/name> anchors."""
    anchors = set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", markdown))
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            text = heading.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def configmap_config(tmp_path: Path) -> Path:
    data = load(K8S / "configmap.yaml")["data"]["metergate.yaml"]
    path = tmp_path / "metergate.yaml"
    path.write_text(data)
    return path


# --- Prometheus configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_check_config(name: str) -> None:
    # Also checks every rule file the config names.
    assert_ok(run(system_tool("promtool"), "check", "config", PROM / name))


def test_promtool_check_config_kubernetes(tmp_path: Path) -> None:
    """prometheus.k8s.yml: with promtool when it knows Kubernetes discovery; Debian's promtool is built without it,
    so then the file is checked without the kubernetes_sd_configs block (relabelling and the rest still by
    promtool) and the discovery block field by field."""
    promtool = system_tool("promtool")
    source = PROM / "prometheus.k8s.yml"
    result = run(promtool, "check", "config", source)
    config = load(source)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "metergate-k8s"]
    if result.returncode != 0:
        assert "field kubernetes_sd_configs not found" in result.stdout + result.stderr, result.stdout + result.stderr
        stripped = {**config, "scrape_configs": [{k: v for k, v in job.items() if k != "kubernetes_sd_configs"}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(stripped, sort_keys=False))
        shutil.copytree(PROM / "rules", tmp_path / "rules")
        assert_ok(run(promtool, "check", "config", tmp_path / "prometheus.yml"))
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    assert {"role": "pod", "label": "app.kubernetes.io/name=metergate"} in sd["selectors"]
    relabel = job["relabel_configs"]
    assert {
        "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
        "regex": "metergate",
        "action": "keep",
    } in relabel
    assert {
        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
        "regex": "metrics",
        "action": "keep",
    } in relabel
    assert {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"} in relabel
    assert {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"} in relabel


@pytest.mark.parametrize(
    ("name", "gateway", "alertmanager"),
    [
        ("prometheus.yml", "metergate:9102", "alertmanager:9093"),
        ("prometheus.local.yml", "127.0.0.1:9102", "127.0.0.1:9093"),
        ("prometheus.k8s.yml", None, "alertmanager.monitoring.svc:9093"),
    ],
)
def test_prometheus_configs_agree(name: str, gateway: str | None, alertmanager: str) -> None:
    config = load(PROM / name)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["rules/*.yml"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [alertmanager]
    for job in config["scrape_configs"]:
        # LLMGatewayTargetDown watches up{job=~"metergate.*"}
        assert re.fullmatch("metergate.*", job["job_name"]), job["job_name"]
    if gateway is not None:
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "metergate"
        assert job["static_configs"][0]["targets"] == [gateway]


# --- rules --------------------------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    assert_ok(run(system_tool("promtool"), "check", "rules", *RULES))


def test_promtool_test_rules() -> None:
    assert RULE_TESTS, "no promtool tests in deploy/prometheus/tests"
    assert_ok(run(system_tool("promtool"), "test", "rules", *RULE_TESTS))


def test_recording_rules_are_the_contract() -> None:
    (group,) = [g for g in rule_groups() if g["name"] == "metergate-recording"]
    names = [r["record"] for r in group["rules"]]
    assert len(names) == len(set(names)), "a recording rule is defined twice"
    assert set(names) == CONTRACT_RECORDING_RULES
    other = [
        r["record"] for g in rule_groups() if g["name"] != "metergate-recording" for r in g["rules"] if "record" in r
    ]
    assert not other, f"recording rules outside metergate-recording: {other}"


def test_required_alerts() -> None:
    assert set(alerts()) == REQUIRED_ALERTS


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_alert_metadata_and_runbook(name: str) -> None:
    rule = alerts()[name]
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{name} has no {key}"
    text = annotations["summary"] + annotations["description"]
    if name not in ("LLMGatewayTargetDown", "LLMMetricsAbsent"):
        # The figure that fired it, and who it is about.
        assert "$value" in text, f"{name}: summary/description do not give the figure"
        # Who it is about: a team, provider or model; for the gateway's own health, the replica.
        assert re.search(r"\$labels\.(team|provider|model|instance)", text), f"{name}: names no team, model or replica"
    url = annotations["runbook_url"]
    assert "/deploy/README.md#" in url, url
    anchor = url.rpartition("#")[2]
    assert anchor == name.lower()
    assert anchor in github_anchors(README.read_text()), f"deploy/README.md has no section #{anchor}"


DURATION_RE = re.compile(r"\[([^\]]+)\]|offset\s+([0-9A-Za-z]+)")


def test_durations_can_be_compressed() -> None:
    """Every duration is one plain literal (5m, 1h, 1d...) so an integration test can rewrite them mechanically."""
    literal = re.compile(r"\d+[mhd]")
    for group in rule_groups():
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            texts = [rule["expr"], *rule.get("annotations", {}).values()]
            for text in texts:
                for match in DURATION_RE.finditer(text):
                    duration = match.group(1) or match.group(2)
                    assert literal.fullmatch(duration), f"{name}: duration {duration!r}"
                assert "time()" not in text, f"{name}: time() arithmetic cannot be compressed"
                big = [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text) if float(n) >= 86400]
                assert not big, f"{name}: {big} look like durations in seconds; use a [1d] range or an offset"
            if "for" in rule:
                assert literal.fullmatch(str(rule["for"])), f"{name}: for: {rule['for']!r}"


def test_every_alert_fires_and_stays_quiet_in_some_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load(path)["tests"]:
            for check in case.get("alert_rule_test") or []:
                name = check["alertname"]
                expected = check.get("exp_alerts") or []
                if not expected:
                    quiet.add(name)
                    continue
                firing.add(name)
                for alert in expected:
                    assert alert.get("exp_labels"), f"{path.name}: {name} fires without exp_labels"
                    assert set(alert.get("exp_annotations") or {}) >= {"summary", "description", "runbook_url"}, (
                        f"{path.name}: {name} fires without its annotations checked"
                    )
    assert not REQUIRED_ALERTS - firing, f"never tested firing: {sorted(REQUIRED_ALERTS - firing)}"
    assert not REQUIRED_ALERTS - quiet, f"never tested quiet: {sorted(REQUIRED_ALERTS - quiet)}"


def test_seed_query_is_tested() -> None:
    exprs = [
        t["expr"] for path in RULE_TESTS for case in load(path)["tests"] for t in case.get("promql_expr_test") or []
    ]
    assert "sum by (team) (llm_tokens_in + llm_tokens_out) * 0.00002" in exprs


# --- Alertmanager -------------------------------------------------------------------------------------------------


def test_amtool_check_config() -> None:
    assert_ok(run(system_tool("amtool"), "check-config", ALERTMANAGER))


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["severity=page", "team=ads"], "page"),
        (["severity=ticket", "team=ads"], "ticket"),
        (["severity=info", "team=ads"], "blackhole"),
        (["severity=page", "team=search"], "team-search,page"),
        (["severity=ticket", "team=search"], "team-search,ticket"),
        (["severity=page"], "page"),
    ],
)
def test_alertmanager_routes(labels: list[str], receivers: str) -> None:
    result = run(
        system_tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER}",
        f"--verify.receivers={receivers}",
        *labels,
    )
    assert_ok(result)


def test_alertmanager_groups_and_inhibits() -> None:
    config = load(ALERTMANAGER)
    assert config["route"]["group_by"] == ["alertname", "team"]
    inhibit = config["inhibit_rules"]
    assert any(
        rule["source_matchers"] == ['alertname="LLMDailyBudgetExceeded"']
        and rule["target_matchers"] == ['alertname="LLMDailyBudgetWarning"']
        and {"team", "app"} <= set(rule["equal"])
        for rule in inhibit
    )


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    result = run(sys.executable, K8S / "generate_prometheusrule.py", "--stdout")
    assert_ok(result)
    committed = (K8S / "prometheusrule.yaml").read_text()
    assert committed == result.stdout, (
        "deploy/kubernetes/prometheusrule.yaml is stale: "
        "run .venv/bin/python deploy/kubernetes/generate_prometheusrule.py"
    )
    rule = yaml.safe_load(committed)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == rule_groups()


def test_configmap_config_passes_check_config(tmp_path: Path) -> None:
    result = run(sys.executable, "-m", "metergate", "check-config", configmap_config(tmp_path))
    assert_ok(result)


def test_kubernetes_manifests(tmp_path: Path) -> None:
    from metergate.config import load_config

    config = load_config(configmap_config(tmp_path))
    deployment = load(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "metergate"
    assert deployment["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "metergate"}
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9102}
    assert config.server.listen == "0.0.0.0:8080"
    assert config.server.metrics_listen == "0.0.0.0:9102"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    # drain + post-response metering + ledger flush, each up to shutdown_timeout_s, after the preStop sleep
    assert spec["terminationGracePeriodSeconds"] > pre_stop + 3 * config.server.shutdown_timeout_s
    assert container["command"][-2:] == ["--config", "/etc/metergate/metergate.yaml"]
    (config_volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == load(K8S / "configmap.yaml")["metadata"]["name"]
    # every credential the config names comes from the Secret
    env = {e["name"]: e for e in container["env"]}
    for provider in config.providers.values():
        if provider.api_key_env:
            assert "secretKeyRef" in env[provider.api_key_env]["valueFrom"], provider.api_key_env

    service = load(K8S / "service.yaml")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "metergate"}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}

    monitor = load(K8S / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "metergate"}
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "metergate"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # the job label is the Service name: LLMGatewayTargetDown's up{job=~"metergate.*"} must match it
    assert re.fullmatch("metergate.*", service["metadata"]["name"])
