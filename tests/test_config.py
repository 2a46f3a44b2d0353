"""Config validation: every error names the field and the line it came from, and `metergate check-config`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metergate.config import Config, ConfigError, hash_key, load_config, parse_config

KEY_A = hashlib.sha256(b"mg-key-a").hexdigest()
KEY_B = hashlib.sha256(b"mg-key-b").hexdigest()

# Line numbers matter: the tests below name them. Line 4 is providers.openai.type.
VALID = f"""\
providers:
  openai:
    base_url: https://api.openai.com/v1/
    type: openai
    api_key_env: MG_TEST_OPENAI_KEY
  claude:
    type: anthropic
    base_url: https://api.anthropic.com
  azure:
    type: azure-openai
    base_url: https://example.openai.azure.com
    api_version: "2024-10-21"
    deployments: {{prod-mini: gpt-4o-mini}}
  groq:
    type: openai-compatible
    base_url: https://api.groq.com/openai/v1
    pricing_provider: groq
  local:
    type: openai-compatible
    base_url: http://127.0.0.1:8000/v1
routes:
  - model: "gpt-*"
    provider: openai
  - model: fast
    provider: openai
    upstream_model: gpt-4o-mini
  - model: "claude-*"
    provider: claude
  - model: "prod-*"
    provider: azure
keys:
  - sha256: "{KEY_A}"
    team: search
    app: ranker
  - sha256: "{KEY_B.upper()}"
    team: ads
    app: bidder
    id: ads-key
teams:
  - name: support
    apps: [assistant, triage]
prices:
  - model: "local-*"
    provider: local
    input_mtok: 0.1
    output_mtok: 0.2
budgets:
  - team: search
    period: day
    limit_usd: 100
  - team: support
    app: triage
    period: month
    limit_usd: 1500
    action: block
server:
  listen: "0.0.0.0:8080"
  timezone: Europe/Paris
"""


def line_of(text: str, fragment: str, nth: int = 1) -> int:
    """The 1-based line of the nth line containing `fragment` (to double-check the numbers the tests state)."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if fragment in line]
    return hits[nth - 1]


def replace_line(text: str, number: int, new: str) -> str:
    lines = text.splitlines()
    lines[number - 1] = new
    return "\n".join(lines) + "\n"


def insert_after(text: str, number: int, new: str) -> str:
    lines = text.splitlines()
    lines.insert(number, new)
    return "\n".join(lines) + "\n"


def error_of(text: str, source: str = "gw.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source=source)
    return str(info.value)


# --- a valid config ------------------------------------------------------------------------------------------------


def test_valid_config_parses() -> None:
    cfg = parse_config(VALID, source="gw.yaml")
    assert isinstance(cfg, Config)
    assert list(cfg.providers) == ["openai", "claude", "azure", "groq", "local"]
    assert cfg.providers["openai"].base_url == "https://api.openai.com/v1"  # trailing slash dropped
    assert {name: p.pricing_provider_id for name, p in cfg.providers.items()} == {
        "openai": "openai",
        "claude": "anthropic",
        "azure": "azure",
        "groq": "groq",
        "local": None,
    }
    assert cfg.providers["azure"].deployments == {"prod-mini": "gpt-4o-mini"}
    assert [(r.model, r.provider, r.upstream_model) for r in cfg.routes] == [
        ("gpt-*", "openai", None),
        ("fast", "openai", "gpt-4o-mini"),
        ("claude-*", "claude", None),
        ("prod-*", "azure", None),
    ]
    assert cfg.routes[0].is_glob and not cfg.routes[1].is_glob
    assert cfg.routes[0].matches("gpt-4o") and not cfg.routes[0].matches("o4-mini")
    # Hashes are stored lower-case; the key id is the config's or the hash's first 12 characters.
    assert [k.sha256 for k in cfg.keys] == [KEY_A, KEY_B]
    assert [k.key_id for k in cfg.keys] == [KEY_A[:12], "ads-key"]
    assert hash_key("mg-key-a") == KEY_A
    assert cfg.known_teams() == {"search", "ads", "support"}
    assert cfg.known_apps() == {"ranker", "bidder", "assistant", "triage"}
    assert [b.scope for b in cfg.budgets] == ["search", "support/triage"]
    assert cfg.budgets[1].action == "block" and cfg.budgets[0].action == "alert"
    assert cfg.prices[0].matches("local", "local-llama") and not cfg.prices[0].matches("openai", "local-llama")
    assert cfg.server.listen == "0.0.0.0:8080"
    assert cfg.server.metrics_listen == "127.0.0.1:9102"
    assert str(cfg.timezone()) == "Europe/Paris"
    assert cfg.ledger is None


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(
        "providers:\n  p: {type: openai, base_url: 'https://x.example'}\nroutes: [{model: '*', provider: p}]\n"
    )
    assert cfg.server.listen == "127.0.0.1:8080"
    assert cfg.server.timezone == "UTC"
    assert cfg.keys == [] and cfg.budgets == [] and cfg.prices == []


@pytest.mark.parametrize(
    "empty",
    [
        "providers: {}\nroutes: [{model: '*', provider: p}]\n",
        "providers:\n  p: {type: openai, base_url: 'https://x.example'}\nroutes: []\n",
    ],
)
def test_a_gateway_with_nothing_to_route_is_refused(empty: str) -> None:
    with pytest.raises(ConfigError, match="at least 1 item"):
        parse_config(empty)


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    text = "server:\n  listen: '127.0.0.1:1'\n  listen: '127.0.0.1:2'\nproviders:\n  p: {type: openai, base_url: 'https://x'}\n"
    with pytest.raises(ConfigError, match=r"<config>:3: duplicate key 'listen' \(first given on line 2\)"):
        parse_config(text + "routes: [{model: '*', provider: p}]\n")


def test_reserved_team_names_are_refused() -> None:
    text = (
        "providers:\n  p: {type: openai, base_url: 'https://x'}\nroutes: [{model: '*', provider: p}]\n"
        f"keys:\n  - {{sha256: '{'a' * 64}', team: other, app: x}}\n"
    )
    with pytest.raises(ConfigError, match=r"keys\.0\.team: 'other' is reserved"):
        parse_config(text)


# --- errors name the field and the line ------------------------------------------------------------------------


def test_unknown_provider_type_names_field_and_line() -> None:
    assert line_of(VALID, "type: openai") == 4
    message = error_of(replace_line(VALID, 4, "    type: openia"))
    assert message.startswith("gw.yaml:4: ")
    assert ":4:" in message and "providers.openai.type" in message
    assert "openai-compatible" in message  # says what is allowed


def test_unknown_top_level_key() -> None:
    text = VALID.replace("server:\n", "sever:\n  listen: '127.0.0.1:1'\nserver:\n")
    number = line_of(text, "sever:")
    assert number == 56
    message = error_of(text)
    assert f"gw.yaml:{number}: sever: unknown field" in message


def test_unknown_top_level_key_at_the_end() -> None:
    text = VALID + "budget:\n  - team: search\n"
    message = error_of(text)
    assert f"gw.yaml:{line_of(text, 'budget:')}: budget: unknown field" in message


def test_unknown_nested_keys() -> None:
    # A typo inside a provider, on line 6 after inserting it below line 5.
    text = insert_after(VALID, 5, "    timeout: 30")
    assert line_of(text, "timeout: 30") == 6
    message = error_of(text)
    assert "gw.yaml:6: providers.openai.timeout: unknown field" in message
    # A typo inside a list item.
    text = replace_line(VALID, 26, "    upstream_modle: gpt-4o-mini")
    message = error_of(text)
    assert "gw.yaml:26: routes.1.upstream_modle: unknown field" in message
    # A typo in the server section.
    text = VALID.replace("  timezone: Europe/Paris", "  timezone: Europe/Paris\n  listn: '127.0.0.1:1'")
    message = error_of(text)
    assert f"gw.yaml:{line_of(text, 'listn')}: server.listn: unknown field" in message


def test_route_to_unknown_provider() -> None:
    assert line_of(VALID, "provider: claude") == 28
    message = error_of(replace_line(VALID, 28, "    provider: anthropic"))
    assert "gw.yaml:28: routes.2.provider" in message
    assert "unknown provider 'anthropic'" in message


def test_duplicate_key_hash() -> None:
    # The second key reuses the first one's hash, in upper case: still the same key.
    assert line_of(VALID, KEY_B.upper()) == 35
    message = error_of(replace_line(VALID, 35, f'  - sha256: "{KEY_A.upper()}"'))
    assert "gw.yaml:35: keys.1.sha256" in message
    assert "duplicate key" in message


@pytest.mark.parametrize("bad", ["abc", "g" * 64, KEY_A[:63], KEY_A + "0", "mg-key-plaintext"])
def test_malformed_sha256(bad: str) -> None:
    assert line_of(VALID, KEY_A) == 32
    message = error_of(replace_line(VALID, 32, f'  - sha256: "{bad}"'))
    assert "gw.yaml:32: keys.0.sha256" in message
    assert "64 hex characters" in message


def test_budget_for_unknown_team() -> None:
    assert line_of(VALID, "- team: search") == 48
    message = error_of(replace_line(VALID, 48, "  - team: serach"))
    assert "gw.yaml:48: budgets.0.team" in message
    assert "unknown team 'serach'" in message


def test_budget_for_unknown_app() -> None:
    assert line_of(VALID, "app: triage") == 52
    message = error_of(replace_line(VALID, 52, "    app: triag"))
    assert "gw.yaml:52: budgets.1.app" in message
    assert "unknown app 'triag'" in message


def test_budget_field_errors() -> None:
    assert line_of(VALID, "period: month") == 53
    message = error_of(replace_line(VALID, 53, "    period: fortnight"))
    assert "gw.yaml:53: budgets.1.period" in message
    message = error_of(VALID.replace("limit_usd: 1500", "limit_usd: 0"))
    assert "gw.yaml:54: budgets.1.limit_usd: Input should be greater than 0" in message


def test_budget_for_an_app_of_another_team() -> None:
    # bidder is ads's app (a key says so); search has no such app.
    message = error_of(replace_line(VALID, 48, "  - team: search\n    app: bidder"))
    assert "gw.yaml:49: budgets.0.app" in message
    assert "no key or teams entry gives team 'search' that app" in message


def test_price_for_an_unknown_provider() -> None:
    assert line_of(VALID, "provider: local") == 44
    message = error_of(replace_line(VALID, 44, "    provider: locl"))
    assert "gw.yaml:44: prices.0.provider: unknown provider 'locl'" in message


def test_pricing_provider_must_be_in_the_catalogue() -> None:
    assert line_of(VALID, "pricing_provider: groq") == 17
    message = error_of(replace_line(VALID, 17, "    pricing_provider: grok"))
    assert "gw.yaml:17: providers.groq.pricing_provider: 'grok' is not a genai-prices provider id" in message
    assert "groq" in message  # lists what is allowed


def test_duplicate_key_id() -> None:
    text = insert_after(VALID, 34, "    id: ads-key")
    message = error_of(text)
    # The second key to take the id is the duplicate.
    assert f"gw.yaml:{line_of(text, 'id: ads-key', nth=2)}: keys.1.id: duplicate key id 'ads-key'" in message


def test_both_listeners_on_one_address() -> None:
    text = VALID.replace('  listen: "0.0.0.0:8080"', '  listen: "0.0.0.0:8080"\n  metrics_listen: "0.0.0.0:8080"')
    assert "server.metrics_listen: must differ from server.listen" in error_of(text)


def test_reserved_names_in_teams_entries() -> None:
    assert "teams.0.apps.1: 'other' is reserved" in error_of(VALID.replace("[assistant, triage]", "[assistant, other]"))


def test_azure_provider_without_api_version() -> None:
    assert line_of(VALID, "api_version:") == 12
    text = "\n".join(line for line in VALID.splitlines() if "api_version" not in line) + "\n"
    message = error_of(text)
    # The error is about the provider as a whole: its line is the provider's own.
    assert "gw.yaml:9: providers.azure" in message
    assert "api_version" in message


def test_api_version_only_for_azure() -> None:
    text = insert_after(VALID, 8, '    api_version: "2024-10-21"')
    message = error_of(text)
    assert "gw.yaml:6: providers.claude" in message
    assert "only apply to azure-openai" in message


def test_invalid_yaml_names_the_line() -> None:
    message = error_of(replace_line(VALID, 8, "    base_url: https://api.anthropic.com: oops"))
    assert message.startswith("gw.yaml:8: invalid YAML")
    message = error_of(replace_line(VALID, 20, "\tbase_url: http://127.0.0.1:8000/v1"))
    assert message.startswith("gw.yaml:20: invalid YAML")


@pytest.mark.parametrize("text", ["- providers\n- routes\n", "just a string\n", "42\n", "", "# only a comment\n"])
def test_document_that_is_not_a_mapping(text: str) -> None:
    message = error_of(text)
    assert message.startswith("gw.yaml: ")
    assert "must be a mapping" in message


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:99999", "127.0.0.1:-1"])
def test_invalid_listen_address(listen: str) -> None:
    assert line_of(VALID, "listen:") == 57
    message = error_of(replace_line(VALID, 57, f'  listen: "{listen}"'))
    assert "gw.yaml:57: server.listen" in message
    assert "HOST:PORT" in message and listen in message


def test_invalid_metrics_listen_address() -> None:
    message = error_of(insert_after(VALID, 57, '  metrics_listen: "9102"'))
    assert "gw.yaml:58: server.metrics_listen" in message


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "Europe/Pariss", "UTC+2"])
def test_unknown_timezone(tz: str) -> None:
    assert line_of(VALID, "timezone:") == 58
    message = error_of(replace_line(VALID, 58, f"  timezone: {tz}"))
    assert "gw.yaml:58: server.timezone" in message
    assert f"unknown timezone '{tz}'" in message


def test_missing_required_section() -> None:
    text = "providers:\n  p: {type: openai, base_url: 'https://x.example'}\n"
    message = error_of(text)
    assert "routes: Field required" in message
    assert message.startswith("gw.yaml:1: ")


def test_base_url_and_label_errors() -> None:
    message = error_of(VALID.replace("https://api.anthropic.com", "api.anthropic.com"))
    assert "gw.yaml:8: providers.claude.base_url: base_url must be an http(s) URL" in message
    message = error_of(VALID.replace("team: ads", "team: ad team"))
    assert f"gw.yaml:{line_of(VALID, 'team: ads')}: keys.1.team" in message


def test_every_error_is_reported_with_its_own_line() -> None:
    text = replace_line(replace_line(VALID, 4, "    type: openia"), 58, "  timezone: Nowhere/City")
    message = error_of(text)
    lines = message.splitlines()
    assert len(lines) == 2, message
    assert any(line.startswith("gw.yaml:4: providers.openai.type") for line in lines)
    assert any(line.startswith("gw.yaml:58: server.timezone") for line in lines)


def test_error_line_of_a_field_named_like_its_provider() -> None:
    text = "providers:\n  type:\n    base_url: https://x.example\n    type: bogus\nroutes: []\n"
    message = error_of(text)
    assert "providers.type.type" in message
    # Regression: config._line_of picked the key node whenever a path element equals the *last* element
    # (`part != loc[-1]` compares values, not positions), so for loc ("providers", "type", "type") it stops at the
    # provider's key on line 2 and reported "gw.yaml:2: providers.type.type: ..." instead of line 4.
    assert message.startswith("gw.yaml:4: "), message


# --- load_config ------------------------------------------------------------------------------------------------


def test_load_config_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(replace_line(VALID, 4, "    type: openia"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:4: providers.openai.type")
    path.write_text(VALID)
    assert load_config(str(path)).providers["openai"].type == "openai"


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID.replace("model: fast", "model: caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}:{line_of(VALID, 'model: fast')}: the config is not UTF-8 text"):
        load_config(path)


def test_an_alias_that_contains_itself() -> None:
    # Walked once per node, not forever: the unknown field is the only problem.
    assert error_of("a: &a [*a]\n" + VALID) == "gw.yaml:1: a: unknown field"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(path)
    assert str(path) in str(info.value)


# --- missing_secrets ------------------------------------------------------------------------------------------------


def test_missing_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    text = insert_after(VALID, 8, "    api_key_env: MG_TEST_ANTHROPIC_KEY")
    cfg = parse_config(text)
    monkeypatch.delenv("MG_TEST_OPENAI_KEY", raising=False)
    monkeypatch.delenv("MG_TEST_ANTHROPIC_KEY", raising=False)
    assert cfg.missing_secrets() == [
        "providers.openai.api_key_env: environment variable MG_TEST_OPENAI_KEY is not set",
        "providers.claude.api_key_env: environment variable MG_TEST_ANTHROPIC_KEY is not set",
    ]
    monkeypatch.setenv("MG_TEST_OPENAI_KEY", "sk-test")
    # An empty variable is as good as unset.
    monkeypatch.setenv("MG_TEST_ANTHROPIC_KEY", "")
    assert cfg.missing_secrets() == [
        "providers.claude.api_key_env: environment variable MG_TEST_ANTHROPIC_KEY is not set"
    ]
    monkeypatch.setenv("MG_TEST_ANTHROPIC_KEY", "sk-ant-test")
    assert cfg.missing_secrets() == []
    # Providers without api_key_env never need a secret.
    no_keys = parse_config(
        "providers:\n  p: {type: openai-compatible, base_url: 'http://127.0.0.1:1'}\n"
        "routes: [{model: '*', provider: p}]\n"
    )
    assert no_keys.missing_secrets() == []


# --- metergate check-config ------------------------------------------------------------------------------------


def check_config(path: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metergate", "check-config", path],
        cwd=cwd,
        # No COLUMNS: check-config runs as in CI or a pipe, where nothing says how wide the output may be.
        env={**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_valid(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(VALID)
    result = check_config("gw.yaml", tmp_path, env={"MG_TEST_OPENAI_KEY": "sk-test"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gw.yaml: valid" in out
    assert "0.0.0.0:8080" in out
    # Routes, in order.
    for model in ("gpt-*", "fast", "claude-*", "prod-*"):
        assert model in out
    assert out.index("gpt-*") < out.index("fast") < out.index("claude-*") < out.index("prod-*")
    assert "gpt-4o-mini" in out  # the alias' upstream model
    # Providers, by name and type.
    for name in ("openai", "claude", "azure", "groq", "local", "anthropic", "azure-openai"):
        assert name in out
    # Teams, from keys and from the teams section, with their apps.
    for name in ("search", "ranker", "ads", "bidder", "support", "assistant", "triage"):
        assert name in out
    # Budgets.
    assert "Budgets" in out
    assert "support/triage" in out and "month" in out and "1,500.00" in out and "block" in out
    assert "100.00" in out and "80%" in out
    # Price overrides.
    assert "local-*" in out
    # The secret is set: no warning.
    assert "warning" not in out


def test_check_config_shows_provider_details_in_full(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(VALID)
    result = check_config("gw.yaml", tmp_path, env={"MG_TEST_OPENAI_KEY": "sk-test"})
    assert result.returncode == 0, result.stderr
    # Regression: check-config's rich Console laid the providers table out in 80 columns when stdout is not a terminal
    # (CI logs, pipes), so the values it exists to show were cut: "https://api.o…", "$MG_TEST_OPEN…",
    # "openai-compat…". The same width limit wraps error lines (test_check_config_prints_the_error_lines_intact).
    for shown in ("https://api.openai.com/v1", "$MG_TEST_OPENAI_KEY", "openai-compatible", "config prices only"):
        assert shown in result.stdout, (shown, result.stdout)


def test_check_config_warns_about_missing_secrets(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(VALID)
    result = check_config("gw.yaml", tmp_path, env={"MG_TEST_OPENAI_KEY": ""})
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stdout and "MG_TEST_OPENAI_KEY" in result.stdout


def test_check_config_invalid(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(replace_line(VALID, 4, "    type: openia"))
    result = check_config("gw.yaml", tmp_path)
    assert result.returncode == 1
    assert "invalid config" in result.stderr
    assert "gw.yaml:4:" in result.stderr
    assert "providers.openai.type" in result.stderr
    assert "Traceback" not in result.stderr
    assert "valid" not in result.stdout


def test_check_config_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(replace_line(VALID, 8, "    base_url: https://api.anthropic.com: oops"))
    result = check_config("gw.yaml", tmp_path)
    assert result.returncode == 1
    assert "gw.yaml:8: invalid YAML" in result.stderr
    result = check_config("missing.yaml", tmp_path)
    assert result.returncode == 1
    assert "cannot read config" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_prints_the_error_lines_intact(tmp_path: Path) -> None:
    """Tools (editors, CI annotations) read `FILE:LINE: field: message`; the CLI must not reflow it."""
    deep = tmp_path / "configs" / "production" / "europe-west" / "gateway"
    deep.mkdir(parents=True)
    path = deep / "gateway-with-a-descriptive-name.yaml"
    path.write_text(replace_line(VALID, 4, "    type: openia"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    expected = str(info.value)
    result = check_config(str(path), tmp_path)
    assert result.returncode == 1
    # Regression: cli._load printed the error with a rich Console, which hard-wrapped at the terminal width
    # (80 columns when stderr is not a terminal), so "<path>:4: providers.openai.type: Input should be ..." came
    # out split across lines (the path itself folded mid-way), FILE:LINE: no longer on one line with the field.
    assert expected in result.stderr.splitlines(), result.stderr


def test_check_config_shows_bracket_globs_as_written(tmp_path: Path) -> None:
    text = (
        "providers:\n"
        "  claude: {type: anthropic, base_url: 'https://api.anthropic.com'}\n"
        "routes:\n"
        "  - {model: 'claude-[hs]*', provider: claude}\n"
    )
    (tmp_path / "gw.yaml").write_text(text)
    assert parse_config(text).routes[0].matches("claude-haiku-4-5")
    result = check_config("gw.yaml", tmp_path)
    assert result.returncode == 0, result.stderr
    # Regression: cli.check_config passed config strings to rich as markup, so "[hs]" is taken for a style tag and the
    # routes table shows the glob as "claude-*" (which would match every claude model): the printed meaning of the
    # config is wrong. Config values need rich.markup.escape (or markup=False).
    assert "claude-[hs]*" in result.stdout, result.stdout


def test_check_config_error_with_brackets_in_a_value(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(replace_line(VALID, 58, '  timezone: "[/Paris]"'))
    assert "server.timezone: unknown timezone '[/Paris]'" in error_of(replace_line(VALID, 58, '  timezone: "[/Paris]"'))
    result = check_config("gw.yaml", tmp_path)
    assert result.returncode == 1
    # Regression: cli._load printed f"[bold red]invalid config[/]\n{exc}" as rich markup; a value such as "[/Paris]" in
    # the message is parsed as a closing tag and check-config dies with rich.errors.MarkupError (a traceback, no
    # "invalid config" report). A value like "[bold]" is silently swallowed instead.
    assert "Traceback" not in result.stderr, result.stderr
    assert "gw.yaml:58: server.timezone" in result.stderr


def test_check_config_lists_what_it_cannot_price(tmp_path: Path) -> None:
    """Issue 9: an operator sees the unpriced models, and the modifiers and units of priced ones, before traffic."""
    (tmp_path / "gw.yaml").write_text(
        "providers:\n"
        '  openai: {type: openai, base_url: "https://api.openai.com"}\n'
        '  vllm: {type: openai-compatible, base_url: "http://vllm:8000"}\n'
        "routes:\n"
        '  - {model: "fast", provider: openai, upstream_model: gpt-4o-mini}\n'
        '  - {model: "gpt-*", provider: openai}\n'
        '  - {model: "llama-3-70b", provider: vllm}\n'
    )
    result = check_config("gw.yaml", tmp_path)
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "gpt-4o-mini │ openai │ gpt-4o-mini │ service_tier=flex" in out
    assert "llama-3-70b │ vllm │ UNPRICED" in out
    assert "warning: llama-3-70b (vllm) has no price" in out
    assert "catalogue models match" in out


def test_check_config_shows_where_calls_naming_no_model_go(tmp_path: Path) -> None:
    config = VALID.replace("routes:\n", 'routes:\n  - {path: "/v1/vector_stores*", provider: groq}\n', 1)
    (tmp_path / "gw.yaml").write_text(config)
    result = check_config("gw.yaml", tmp_path, env={"MG_TEST_OPENAI_KEY": "sk-test"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "path /v1/vector_stores*" in out
    assert "Calls naming no model" in out
    # Per API: the path route first, then the first provider speaking that API for anything else.
    table = out[out.index("Calls naming no model") :]
    assert "/v1/vector_stores*" in table and "groq" in table
    assert "(any other path)" in table and "openai" in table and "claude" in table


@pytest.mark.parametrize(
    ("route", "error"),
    [
        ("{provider: openai}", "either `model:`"),
        ('{model: "gpt-*", path: "/v1/files*", provider: openai}', "either `model:`"),
        ('{path: "v1/files", provider: openai}', "must start with /"),
        ('{path: "/v1/files*", provider: openai, upstream_model: x}', "model routes only"),
    ],
)
def test_route_names_a_model_or_a_path(route: str, error: str) -> None:
    text = VALID.replace("routes:\n", f"routes:\n  - {route}\n", 1)
    with pytest.raises(ConfigError, match=error):
        parse_config(text, source="gw.yaml")
