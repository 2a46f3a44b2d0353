"""Batch jobs through the gateway with the official SDKs (issue 10): every batched request billed once, at the
batch price, to the key that created the batch, whether its results pass through the gateway or not."""

from __future__ import annotations

import io
import socket
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import orjson
import pytest
from google import genai
from google.genai import types as genai_types

from metergate.simulator import Bill, SimulatorThread
from tests.conftest import KEYS, Gateway, create_pg_database, drop_pg_database, make_gateway, wait_for
from tests.pricesheet import cost

SCOPE = "support/assistant"
LABELS = {"team": "support", "app": "assistant"}
BATCH = Decimal("0.5")  # every provider bills batched requests at half the standard price


def ledger(tmp: Path) -> str:
    return f'ledger: {{url: "sqlite:///{tmp / "ledger.db"}", flush_interval_s: 0.05}}\n'


@pytest.fixture(scope="module")
def gw(simulator: SimulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("batches")
    gateway = make_gateway(tmp, simulator.url, extra=ledger(tmp) + "batches: {poll_interval_s: 0.2}\n").start()
    yield gateway
    gateway.stop()


def rows(gw: Gateway, endpoint: str) -> list[sqlite3.Row]:
    with sqlite3.connect(Path(gw.config_path).parent / "ledger.db") as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM usage_records WHERE endpoint = ?", (endpoint,)).fetchall()


def batch_rows(gw: Gateway, endpoint: str, batch_bills: list[Bill]) -> list[sqlite3.Row]:
    """The ledger rows of the given batched requests (by their model and tokens, in bill order)."""
    found = rows(gw, endpoint)
    return [r for r in found if r["upstream_model"] and r["details"] and '"batch"' in r["details"]] or found


def expected_cost(bills: list[Bill], model: str) -> Decimal:
    return sum((cost(model, b.reported) * BATCH for b in bills), Decimal(0))


def assert_batch_billed(gw: Gateway, before, bills: list[Bill], endpoint: str, model: str) -> None:  # type: ignore[no-untyped-def]
    labels = {**LABELS, "endpoint": endpoint}
    want_in = sum(b.reported.input for b in bills)
    want_out = sum(b.reported.output for b in bills)
    assert wait_for(lambda: gw.metrics().delta(before, "llm_tokens_in", **labels) == want_in, timeout=15), (
        gw.metrics().delta(before, "llm_tokens_in", **labels),
        want_in,
    )
    after = gw.metrics()
    assert after.delta(before, "llm_tokens_out", **labels) == want_out
    got = Decimal(repr(after.delta(before, "llm_total_cost_usd", model=model, **labels)))
    want = expected_cost(bills, model)
    assert abs(got - want) <= Decimal("1e-9"), (got, want)


def openai_batch_file(client: openai.OpenAI, n: int, model: str = "gpt-4o-mini") -> str:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {i} " * (i + 1)}]},
        }
        for i in range(n)
    ]
    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    return client.files.create(file=("batch.jsonl", data), purpose="batch").id


def oai(gw: Gateway, tag: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=KEYS[SCOPE], max_retries=0, default_headers={"x-sim-tag": tag, **headers}
    )


# --- OpenAI -------------------------------------------------------------------------------------------------------


def test_openai_batch_billed_once_at_the_batch_price(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    client = oai(gw, tag, **{"x-sim-batch-ms": "600000"})  # finishes only when the test says so
    before = gw.metrics()
    batch = client.batches.create(
        input_file_id=openai_batch_file(client, 3), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    bills = simulator.app.billed(tag)
    assert len(bills) == 3 and all(b.batch == batch.id for b in bills)
    time.sleep(0.6)  # polled while running: nothing billed yet
    assert gw.metrics().delta(before, "llm_tokens_in", endpoint="/v1/batches", **LABELS) == 0
    simulator.app.resources.batches[batch.id].ready_at = time.time()
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    content = client.files.content(done.output_file_id).content
    assert content.count(b"\n") == 3
    assert_batch_billed(gw, before, bills, "/v1/batches", "gpt-4o-mini")
    # Fetching the results again, and the poller reading them too, never bills twice.
    client.files.content(done.output_file_id)
    time.sleep(0.8)
    assert_batch_billed(gw, before, bills, "/v1/batches", "gpt-4o-mini")
    billed = [r for r in rows(gw, "/v1/batches") if r["tokens_in"]]
    assert len(billed) == 3 and {r["team"] for r in billed} == {"support"}
    assert all('"batch"' in r["details"] for r in billed)


def test_openai_batch_billed_by_polling_when_results_are_fetched_elsewhere(
    gw: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    client = oai(gw, tag)
    before = gw.metrics()
    client.batches.create(
        input_file_id=openai_batch_file(client, 2), endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Nobody retrieves the batch or its results through the gateway: the poller does.
    assert_batch_billed(gw, before, simulator.app.billed(tag), "/v1/batches", "gpt-4o-mini")


# --- Anthropic ----------------------------------------------------------------------------------------------------


def test_anthropic_batch_results_billed_once(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    client = anthropic.Anthropic(
        base_url=gw.url,
        api_key=KEYS[SCOPE],
        max_retries=0,
        default_headers={"x-sim-tag": tag, "x-sim-batch-ms": "600000"},
    )
    before = gw.metrics()
    batch = client.messages.batches.create(
        requests=[
            {
                "custom_id": f"c{i}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": "hi " * i}],
                },
            }
            for i in range(1, 4)
        ]
    )
    bills = simulator.app.billed(tag)
    simulator.app.resources.batches[batch.id].ready_at = time.time()
    results = list(client.messages.batches.results(batch.id))  # follows results_url: the gateway's
    assert sorted(r.custom_id for r in results) == ["c1", "c2", "c3"]
    assert_batch_billed(gw, before, bills, "/v1/messages/batches", "claude-haiku-4-5")
    list(client.messages.batches.results(batch.id))
    time.sleep(0.8)
    assert_batch_billed(gw, before, bills, "/v1/messages/batches", "claude-haiku-4-5")


def test_deleting_a_batch_bills_its_results_first(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    """Deleting a batch destroys its results: the gateway bills them before forwarding the deletion, so deleting
    before anyone (or the poller) read them does not make the spend disappear."""
    gateway = make_gateway(tmp_path, simulator.url, extra="batches: {poll_interval_s: 3600}\n").start()
    try:
        client = anthropic.Anthropic(
            base_url=gateway.url, api_key=KEYS[SCOPE], max_retries=0, default_headers={"x-sim-tag": tag}
        )
        before = gateway.metrics()
        request = {"model": "claude-haiku-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
        batch = client.messages.batches.create(requests=[{"custom_id": "only", "params": request}])
        bills = simulator.app.billed(tag)
        client.messages.batches.delete(batch.id)
        assert batch.id not in simulator.app.resources.batches
        assert_batch_billed(gateway, before, bills, "/v1/messages/batches", "claude-haiku-4-5")
        # An OpenAI output file likewise, even when the gateway never saw the batch retrieved (its results file
        # id learned elsewhere): billed, then deleted.
        oclient = oai(gateway, tag)
        before = gateway.metrics()
        obatch = oclient.batches.create(
            input_file_id=openai_batch_file(oclient, 2), endpoint="/v1/chat/completions", completion_window="24h"
        )
        output = simulator.app.resources.batches[obatch.id].output_file_id
        assert output is not None
        assert oclient.files.delete(output).deleted
        obills = [b for b in simulator.app.billed(tag) if b.batch == obatch.id]
        assert_batch_billed(gateway, before, obills, "/v1/batches", "gpt-4o-mini")
    finally:
        gateway.stop()


# --- Gemini -------------------------------------------------------------------------------------------------------


def gem(gw: Gateway, tag: str) -> genai.Client:
    return genai.Client(
        api_key=KEYS[SCOPE], http_options=genai_types.HttpOptions(base_url=gw.url, headers={"x-sim-tag": tag})
    )


def test_gemini_inline_batch_billed_once(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    client = gem(gw, tag)
    before = gw.metrics()
    job = client.batches.create(
        model="gemini-2.5-flash",
        src=[{"contents": [{"parts": [{"text": f"capital of country {i}?"}], "role": "user"}]} for i in range(3)],
    )
    assert job.name and job.name.startswith("batches/")
    bills = simulator.app.billed(tag)
    assert len(bills) == 3
    fetched = client.batches.get(name=job.name)
    assert fetched.state is not None and fetched.state.name == "JOB_STATE_SUCCEEDED"
    assert_batch_billed(gw, before, bills, "/v1/models/{model}:batchGenerateContent", "gemini-2.5-flash")
    client.batches.get(name=job.name)
    time.sleep(0.8)
    assert_batch_billed(gw, before, bills, "/v1/models/{model}:batchGenerateContent", "gemini-2.5-flash")


def test_gemini_file_batch_billed_once(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    client = gem(gw, tag)
    lines = b"".join(
        orjson.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"q{i}"}], "role": "user"}]}})
        + b"\n"
        for i in range(4)
    )
    src = client.files.upload(file=io.BytesIO(lines), config={"mime_type": "application/jsonl", "display_name": "in"})
    before = gw.metrics()
    job = client.batches.create(model="gemini-2.5-flash", src=src.name)
    bills = simulator.app.billed(tag)
    assert len(bills) == 4
    done = client.batches.get(name=job.name)
    assert done.dest is not None and done.dest.file_name
    results = client.files.download(file=done.dest.file_name)
    assert results.count(b"\n") == 4
    assert_batch_billed(gw, before, bills, "/v1/models/{model}:batchGenerateContent", "gemini-2.5-flash")


# --- budgets and restarts -----------------------------------------------------------------------------------------


def test_block_budget_refuses_batch_creation(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    gateway = make_gateway(
        tmp_path,
        simulator.url,
        extra="budgets:\n  - {team: support, period: month, limit_usd: 0.0000001, action: block}\n",
    ).start()
    try:
        client = oai(gateway, tag)
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "spend"}])
        file_id = openai_batch_file(client, 1)  # uploads are free: still accepted
        with pytest.raises(openai.RateLimitError) as info:
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert info.value.code == "budget_exceeded"
        assert not any(b.batch for b in simulator.app.billed(tag))
    finally:
        gateway.stop()


def test_batch_billed_after_a_restart(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    """The batch outlives the process that saw it created: the next process polls it from the ledger."""
    extra = ledger(tmp_path) + "batches: {poll_interval_s: 0.2}\n"
    first = make_gateway(tmp_path, simulator.url, extra=extra).start()
    client = oai(first, tag, **{"x-sim-batch-ms": "600000"})
    batch = client.batches.create(
        input_file_id=openai_batch_file(client, 2), endpoint="/v1/chat/completions", completion_window="24h"
    )
    first.stop()
    simulator.app.resources.batches[batch.id].ready_at = time.time()
    second = make_gateway(tmp_path, simulator.url, extra=extra)
    second.config_path.write_text(
        first.config_path.read_text()
        .replace(first.listen, second.listen)
        .replace(first.metrics_listen, second.metrics_listen)
    )
    second.start()
    try:
        before = second.metrics()
        assert_batch_billed(second, before, simulator.app.billed(tag), "/v1/batches", "gpt-4o-mini")
    finally:
        second.stop()


def test_two_replicas_polling_one_batch_bill_it_once(simulator: SimulatorThread, tmp_path: Path, tag: str) -> None:
    """Replicas sharing a PostgreSQL ledger all poll every open batch (each learns of the others' batches from the
    ledger) and all read the results: the claims in `batch_items` let each request be billed by exactly one."""
    url = create_pg_database()
    extra = f'ledger: {{url: "{url}", flush_interval_s: 0.05}}\nbatches: {{poll_interval_s: 0.1}}\n'
    replicas = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(make_gateway(tmp_path / name, simulator.url, extra=extra).start())
        a, b = replicas
        client = oai(a, tag, **{"x-sim-batch-ms": "600000"})
        batch = client.batches.create(
            input_file_id=openai_batch_file(client, 3), endpoint="/v1/chat/completions", completion_window="24h"
        )
        time.sleep(1.5)  # b reads the open batch from the ledger
        simulator.app.resources.batches[batch.id].ready_at = time.time()
        done = oai(b, tag).batches.retrieve(batch.id)
        oai(b, tag).files.content(done.output_file_id or "")
        oai(a, tag).files.content(done.output_file_id or "")
        bills = simulator.app.billed(tag)
        want = sum(bill.reported.input for bill in bills)

        def billed() -> float:
            return sum(r.metrics().sum("llm_tokens_in", endpoint="/v1/batches", **LABELS) for r in replicas)

        assert wait_for(lambda: billed() == want, timeout=15), (billed(), want)
        time.sleep(1.0)  # every replica has polled and read the results by now
        assert billed() == want
        import psycopg

        with psycopg.connect(url) as conn:
            n, tokens = conn.execute(
                "SELECT COUNT(*), SUM(tokens_in) FROM usage_records WHERE endpoint = '/v1/batches' AND tokens_in > 0"
            ).fetchone()
        assert n == 3 and tokens == want
    finally:
        for replica in replicas:
            replica.stop()
        drop_pg_database(url)


def test_batch_results_of_unknown_batches_pass_untouched(gw: Gateway) -> None:
    """Results of a batch the gateway never saw created are relayed as they are and bill nothing."""
    r = httpx.get(f"{gw.url}/v1/files/file-unknown/content", headers=gw.headers(SCOPE))
    assert r.status_code == 404


# --- adversarial review of the batch surface ---------------------------------------------------------------------


def test_batch_created_by_a_client_that_hung_up_is_still_billed(
    gw: Gateway, simulator: SimulatorThread, tag: str
) -> None:
    """The creator hangs up before the creation answer arrives: the gateway reads that answer anyway (the batch
    must be known to be billed), then bills its results when they are read, here through the gateway."""
    client = oai(gw, tag)
    file_id = openai_batch_file(client, 3)
    body = orjson.dumps({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    before = gw.metrics()
    host, port = gw.listen.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/batches HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + KEYS[SCOPE].encode()
            + b"\r\nContent-Type: application/json\r\nx-sim-delay-ms: 300\r\nx-sim-tag: "
            + tag.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        time.sleep(0.1)  # the request is forwarded; the answer is not there yet
    bills = [b for b in simulator.app.billed(tag) if b.batch]
    assert wait_for(lambda: len([b for b in simulator.app.billed(tag) if b.batch]) == 3)
    assert_batch_billed(
        gw, before, [b for b in simulator.app.billed(tag) if b.batch] or bills, "/v1/batches", "gpt-4o-mini"
    )


def test_gemini_requests_sharing_a_key_are_each_billed(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    """`metadata.key` is the client's to choose and need not be unique: it does not decide what was billed."""
    before = gw.metrics()
    requests = [
        {"request": {"contents": [{"role": "user", "parts": [{"text": f"q{i}"}]}]}, "metadata": {"key": "same"}}
        for i in range(6)
    ]
    r = httpx.post(
        f"{gw.url}/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        headers={"x-goog-api-key": KEYS[SCOPE], "x-sim-tag": tag},
        json={"batch": {"inputConfig": {"requests": {"requests": requests}}}},
    )
    assert r.status_code == 200
    bills = simulator.app.billed(tag)
    assert len(bills) == 6
    assert_batch_billed(gw, before, bills, "/v1beta/models/{model}:batchGenerateContent", "gemini-2.5-flash")


def test_large_inline_gemini_batch_billed_by_the_poller(gw: Gateway, simulator: SimulatorThread, tag: str) -> None:
    """A batch object of several hundred kilobytes, never fetched through the gateway: the poller reads it whole."""
    before = gw.metrics()
    requests = [{"request": {"contents": [{"role": "user", "parts": [{"text": f"q{i}"}]}]}} for i in range(40)]
    r = httpx.post(
        f"{gw.url}/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        headers={"x-goog-api-key": KEYS[SCOPE], "x-sim-tag": tag, "x-sim-output-tokens": "1500"},
        json={"batch": {"inputConfig": {"requests": {"requests": requests}}}},
    )
    assert r.status_code == 200
    name = r.json()["name"]
    assert len(orjson.dumps(simulator.app.resources._gemini_batch(simulator.app.resources.batches[name]))) > 300_000
    assert_batch_billed(
        gw, before, simulator.app.billed(tag), "/v1beta/models/{model}:batchGenerateContent", "gemini-2.5-flash"
    )


@pytest.mark.parametrize("query", ["fields=metadata.output", "alt=proto", "%24fields=name", "callback=x"])
def test_gemini_batch_reads_that_would_hide_results_are_refused(gw: Gateway, query: str) -> None:
    r = httpx.get(f"{gw.url}/v1beta/batches/abc?{query}", headers={"x-goog-api-key": KEYS[SCOPE]})
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_batches_of_unrouted_models_are_refused(gw: Gateway, simulator: SimulatorThread) -> None:
    seen = len(simulator.app.bills)
    r = httpx.post(
        f"{gw.url}/v1beta/models/unrouted-model:batchGenerateContent",
        headers={"x-goog-api-key": KEYS[SCOPE]},
        json={"batch": {"inputConfig": {"requests": {"requests": []}}}},
    )
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    assert len(simulator.app.bills) == seen
