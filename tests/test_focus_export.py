"""`metergate export focus`: the ledger as a FOCUS 1.0 dataset, checked by the FinOps Foundation's own validator
(focus-validator, in .venv-focus: `make test` installs it) and summed back to the ledger to the pico-dollar."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import openai
import pytest

from metergate.focus import COLUMNS
from tests.conftest import KEYS, Gateway, cli, make_gateway, sqlite_ledger

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = ROOT / ".venv-focus" / "bin" / "focus-validator"
TZ = "Europe/Paris"
TODAY = datetime.now(ZoneInfo(TZ)).date().isoformat()


def validate(path: Path) -> str:
    """Runs focus-validator on a file for FOCUS 1.0 and returns its report. It exits 0 even when checks fail, so
    the verdict is read from its output; it finds its currency list relative to the working directory, so it runs
    from its own package directory (focus-validator 1.0.0)."""
    assert VALIDATOR.exists(), f"{VALIDATOR} is missing: run `make test` (or make .venv-focus/.installed)"
    site = next((ROOT / ".venv-focus" / "lib").glob("python3*/site-packages"))
    out = subprocess.run(
        [str(VALIDATOR), "--data-file", str(path), "--validate-version", "1.0"],
        cwd=site,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def gw(simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("focus")
    extra = (
        sqlite_ledger(tmp) + 'prices:\n  - {provider: openai, model: "gpt-4.1", input_mtok: 1.5, output_mtok: 6.0}\n'
        "attribution: {tags: [customer, env]}\n"
    )
    g = make_gateway(
        tmp,
        simulator.url,
        server_extra=f', timezone: "{TZ}"',
        routes_first='  - {model: "dall-e-*", provider: openai}\n',
        extra=extra,
    ).start()
    oa = {s: openai.OpenAI(base_url=g.url + "/v1", api_key=k, max_retries=0) for s, k in KEYS.items()}
    for i in range(12):
        scope = list(KEYS)[i % 3]
        headers = {"x-metergate-user": f"user-{i % 4}", "x-metergate-tags": f"customer=c{i % 2},env=prod"}
        if i == 5:
            headers["x-metergate-user"] = "=HYPERLINK(1)"  # a user id a spreadsheet would run
        oa[scope].chat.completions.create(
            model=("gpt-4o-mini", "gpt-4.1", "gpt-4o")[i % 3],
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=300,
            extra_headers=headers | {"x-sim-input-tokens": str(1000 + 7 * i), "x-sim-cached-tokens": "256"},
        )
    oa["ads/bidder"].embeddings.create(model="text-embedding-3-small", input=["x"] * 3)
    oa["ads/bidder"].images.generate(model="dall-e-3", prompt="a cat", size="1024x1024")
    time.sleep(0.3)
    yield g
    g.stop()


def ledger_total(gw: Gateway) -> Decimal:
    db = sqlite3.connect(str(gw.config_path.parent / "ledger.db"))
    (pusd,) = db.execute("SELECT SUM(cost_pusd) FROM usage_records").fetchone()
    db.close()
    return Decimal(pusd) / Decimal(10**12)


def export(gw: Gateway, tmp: Path, fmt: str) -> Path:
    out = tmp / f"focus.{fmt}"
    r = cli(gw, "export", "focus", "--from", TODAY, "--to", TODAY, "--output", str(out), "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert "rows" in r.stderr and "FOCUS 1.0" in r.stderr
    return out


def test_csv_export_passes_the_focus_validator_and_sums_to_the_ledger(gw: Gateway, tmp_path: Path) -> None:
    path = export(gw, tmp_path, "csv")
    report = validate(path)
    assert "Validation succeeded." in report, report
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(COLUMNS)
    total = ledger_total(gw)
    assert total > 0
    assert sum(Decimal(r["BilledCost"]) for r in rows) == total  # to the pico-dollar
    assert all(r["BilledCost"] == r["EffectiveCost"] == r["ContractedCost"] for r in rows)
    assert {r["ServiceCategory"] for r in rows} == {"AI and Machine Learning"}
    assert {r["ChargeCategory"] for r in rows} == {"Usage"}
    assert {r["ProviderName"] for r in rows} == {"OpenAI"}
    # one row per day x team x app x provider x model x user x tag values
    keys = [(r["ChargePeriodStart"], r["Tags"], r["ResourceName"]) for r in rows]
    assert len(keys) == len(set(keys))
    # the charge period is the local day, stated in UTC
    start = datetime.fromisoformat(rows[0]["ChargePeriodStart"].replace("Z", "+00:00")).astimezone(ZoneInfo(TZ))
    assert (start.hour, start.minute, start.date().isoformat()) == (0, 0, TODAY)
    tagged = [json.loads(r["Tags"]) for r in rows if r["ResourceName"] == "gpt-4o-mini"]
    assert all(set(t) >= {"team", "app", "user", "customer", "env"} for t in tagged)
    assert {r["x_User"] for r in rows} >= {"user-0", "user-1", "'=HYPERLINK(1)"}  # never a formula


def test_list_cost_is_the_catalogue_price_where_the_config_overrides_it(gw: Gateway, tmp_path: Path) -> None:
    rows = list(csv.DictReader(export(gw, tmp_path, "csv").open()))
    for r in rows:
        if r["ResourceName"] == "gpt-4.1":  # config $1.50/$6 per M; catalogue $2 in, $0.50 cached, $8 out per M
            assert Decimal(r["ListCost"]) > Decimal(r["BilledCost"]) > 0
            tokens_in, cached, out = int(r["x_InputTokens"]), int(r["x_CachedInputTokens"]), int(r["x_OutputTokens"])
            listed = (Decimal(tokens_in - cached) * 2 + Decimal(cached) * Decimal("0.5") + Decimal(out) * 8) / 10**6
            assert Decimal(r["ListCost"]) == listed
            assert r["SkuPriceId"].endswith("/config")
        else:
            assert r["ListCost"] == r["BilledCost"]
            assert r["SkuPriceId"].endswith("/genai-prices-0.2.3")
    image = [r for r in rows if r["ResourceName"] == "dall-e-3"]
    assert [(r["ConsumedQuantity"], r["ConsumedUnit"]) for r in image] == [("1.0", "Images")]
    tokens = [r for r in rows if r["ResourceName"] == "gpt-4o-mini"]
    assert all(Decimal(r["ConsumedQuantity"]) == int(r["x_InputTokens"]) + int(r["x_OutputTokens"]) > 0 for r in tokens)


def test_parquet_export_passes_the_focus_validator_with_the_same_rows(gw: Gateway, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    path = export(gw, tmp_path, "parquet")
    report = validate(path)
    assert "Validation succeeded." in report, report
    table = pq.read_table(path)
    assert table.column_names == list(COLUMNS)
    assert str(table.schema.field("ChargePeriodStart").type) == "timestamp[us, tz=UTC]"
    billed = table.column("BilledCost").to_pylist()
    assert sum(Decimal(repr(v)) for v in billed) == ledger_total(gw)  # each cost kept to the pico-dollar
    csv_rows = list(csv.DictReader(export(gw, tmp_path, "csv").open()))
    assert len(billed) == len(csv_rows)


def test_validator_catches_a_broken_export(gw: Gateway, tmp_path: Path) -> None:
    """The check above can fail: the same file with a ServiceCategory FOCUS does not know is refused."""
    path = export(gw, tmp_path, "csv")
    broken = tmp_path / "broken.csv"
    broken.write_text(path.read_text().replace("AI and Machine Learning", "AI"))
    report = validate(broken)
    assert "Validation succeeded." not in report and "ServiceCategory" in report


def test_export_refuses_bad_arguments(gw: Gateway, tmp_path: Path) -> None:
    r = cli(gw, "export", "focus", "--from", TODAY, "--to", "2000-01-01", "--output", str(tmp_path / "x.csv"))
    assert r.returncode == 1 and "before" in r.stderr
    r = cli(gw, "export", "focus", "--from", TODAY, "--to", TODAY, "--output", str(tmp_path / "x"), "--format", "xls")
    assert r.returncode == 1 and "csv or parquet" in r.stderr
