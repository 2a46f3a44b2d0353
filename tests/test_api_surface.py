"""The whole provider API through one base URL (issue 10): what the gateway does not meter as it passes is
forwarded untouched, authenticated, attributed and counted, driven here with the official SDKs."""

from __future__ import annotations

import io
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from metergate.simulator import DEFAULT_KEYS, SimulatorThread
from tests.conftest import KEYS, Gateway, make_gateway, wait_for

SCOPE = "search/indexer"
LABELS = {"team": "search", "app": "indexer"}


@pytest.fixture(scope="module")
def second_openai() -> Iterator[SimulatorThread]:
    """Another OpenAI upstream (an EU project), for `path:` routes."""
    sim = SimulatorThread().start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def gw(simulator: SimulatorThread, second_openai: SimulatorThread, tmp_path_factory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    gateway = make_gateway(
        tmp_path_factory.mktemp("surface"),
        simulator.url,
        env={"SIM_OPENAI_EU_KEY": DEFAULT_KEYS["openai"]},
        providers_extra=(
            f'  openai-eu: {{type: openai, base_url: "{second_openai.url}", api_key_env: SIM_OPENAI_EU_KEY}}\n'
        ),
        routes_first='  - {path: "/v1/vector_stores*", provider: openai-eu}\n',
    ).start()
    yield gateway
    gateway.stop()


def oai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[SCOPE], max_retries=0)


def ant(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=KEYS[SCOPE], max_retries=0)


def gem(gw: Gateway, version: str | None = None) -> genai.Client:
    options = genai_types.HttpOptions(base_url=gw.url, api_version=version) if version else None
    options = options or genai_types.HttpOptions(base_url=gw.url)
    return genai.Client(api_key=KEYS[SCOPE], http_options=options)


def counted(gw: Gateway, before, endpoint: str, provider: str, code: str = "200", n: int = 1) -> None:  # type: ignore[no-untyped-def]
    labels = {**LABELS, "endpoint": endpoint, "provider": provider, "code": code}
    assert wait_for(lambda: gw.metrics().delta(before, "llm_requests_total", **labels) == n), (
        endpoint,
        gw.metrics().delta(before, "llm_requests_total", **labels),
    )
    assert gw.metrics().delta(before, "llm_total_cost_usd", **labels) == 0


def test_openai_files_roundtrip_byte_for_byte(gw: Gateway, simulator: SimulatorThread) -> None:
    client = oai(gw)
    content = bytes(range(256)) * 64 + b'{"custom_id": "x"}\r\n--not-a-boundary--\r\n'
    before = gw.metrics()
    created = client.files.create(file=("data.bin", content), purpose="user_data")
    upload = simulator.app.received[-1]
    assert upload.path == "/v1/files" and upload.headers["authorization"] == f"Bearer {DEFAULT_KEYS['openai']}"
    # The multipart framing the SDK wrote reached the provider unchanged (same boundary, same bytes).
    assert upload.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert content in upload.raw and int(upload.headers["content-length"]) == len(upload.raw)
    assert created.bytes == len(content) and created.filename == "data.bin"
    assert client.files.retrieve(created.id).id == created.id
    assert client.files.content(created.id).content == content
    assert any(f.id == created.id for f in client.files.list())
    assert client.files.delete(created.id).deleted
    counted(gw, before, "/v1/files", "openai", n=2)  # create, list
    counted(gw, before, "/v1/files/{file_id}", "openai", n=2)  # retrieve, delete
    counted(gw, before, "/v1/files/{file_id}/content", "openai")


def test_gateway_key_never_reaches_the_provider(gw: Gateway, simulator: SimulatorThread) -> None:
    oai(gw).files.list()
    seen = simulator.app.received[-1]
    assert KEYS[SCOPE] not in str(seen.headers) and KEYS[SCOPE] not in seen.query


def test_vector_stores_follow_a_path_route(gw: Gateway, second_openai: SimulatorThread, simulator) -> None:  # type: ignore[no-untyped-def]
    client = oai(gw)
    before = gw.metrics()
    vs = client.vector_stores.create(name="kb")
    assert client.vector_stores.retrieve(vs.id).name == "kb"
    assert any(v.id == vs.id for v in client.vector_stores.list())
    file = client.files.create(file=("kb.txt", b"knowledge"), purpose="assistants")  # no path route: openai
    attached = client.vector_stores.files.create(vector_store_id=vs.id, file_id=file.id)
    assert attached.vector_store_id == vs.id
    # Created at openai-eu (the path route), not at the first OpenAI provider.
    assert vs.id in second_openai.app.resources.vector_stores and vs.id not in simulator.app.resources.vector_stores
    assert client.vector_stores.delete(vs.id).deleted
    counted(gw, before, "/v1/vector_stores", "openai-eu", n=2)
    counted(gw, before, "/v1/vector_stores/{vector_store_id}", "openai-eu", n=2)
    counted(gw, before, "/v1/vector_stores/{vector_store_id}/**", "openai-eu")
    counted(gw, before, "/v1/files", "openai")


def test_fine_tuning_list_free_and_job_creation_unmetered(gw: Gateway) -> None:
    client = oai(gw)
    before = gw.metrics()
    assert client.fine_tuning.jobs.list().data == []
    job = client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file="file-abc")
    assert job.status == "validating_files"
    counted(gw, before, "/v1/fine_tuning/jobs", "openai", n=2)
    after = gw.metrics()
    # Training is billed by the provider outside any response the gateway sees: the creation counts as unmetered.
    assert after.delta(before, "llm_unmetered_requests_total", endpoint="/v1/fine_tuning/jobs", **LABELS) == 1


def test_moderations_free_and_counted(gw: Gateway) -> None:
    before = gw.metrics()
    result = oai(gw).moderations.create(input=["hello", "world"], model="omni-moderation-latest")
    assert len(result.results) == 2 and not result.results[0].flagged
    counted(gw, before, "/v1/moderations", "openai")


def test_anthropic_models_are_anthropics(gw: Gateway) -> None:
    client = ant(gw)
    before = gw.metrics()
    models = client.models.list()
    assert all(m.id.startswith("claude-") for m in models.data) and models.data[0].display_name
    assert client.models.retrieve("claude-haiku-4-5-20251001").display_name == "Claude Haiku 4.5"
    counted(gw, before, "/v1/models", "anthropic")
    counted(gw, before, "/v1/models/{model}", "anthropic")


def test_openai_models_still_the_gateways_own_list(gw: Gateway) -> None:
    ids = [m.id for m in oai(gw).models.list().data]
    assert "gpt-4o-mini" in ids and not any(i.startswith("claude") for i in ids)


@pytest.mark.parametrize("version", [None, "v1beta"])
def test_google_genai_models_get_and_list(gw: Gateway, version: str | None) -> None:
    """google-genai 3.x calls the Gemini API as `v1` by default: `/v1/models/...` with `x-goog-api-key` is
    Gemini's, not OpenAI's."""
    client = gem(gw, version)
    before = gw.metrics()
    model = client.models.get(model="gemini-2.5-flash")
    assert model.name == "models/gemini-2.5-flash" and model.input_token_limit == 1048576
    names = [m.name for m in client.models.list()]
    assert "models/gemini-2.5-pro" in names
    prefix = f"/{version or 'v1'}"
    counted(gw, before, f"{prefix}/models/{{model}}", "gemini")
    counted(gw, before, f"{prefix}/models", "gemini")


def test_google_genai_files_upload_through_the_gateway(gw: Gateway, simulator: SimulatorThread) -> None:
    """The resumable upload: the session URL the provider answers is rewritten to the gateway, and the SDK's
    follow-up requests (which carry no key) are attributed to the key that opened the session."""
    client = gem(gw)
    data = b"%PDF-1.4 simulated " + bytes(range(256)) * 40
    before = gw.metrics()
    file = client.files.upload(file=_bytes_file(data), config={"mime_type": "application/pdf", "display_name": "doc"})
    assert file.name and file.name.startswith("files/") and file.size_bytes == len(data)
    stored = simulator.app.resources.files[file.name]
    assert stored.data == data
    assert client.files.get(name=file.name).display_name == "doc"
    counted(gw, before, "/upload/v1/files", "gemini", n=2)  # start, then upload+finalize
    counted(gw, before, "/v1/files/{file}", "gemini")


def test_gemini_upload_url_points_at_the_gateway(gw: Gateway) -> None:
    r = httpx.post(
        f"{gw.url}/upload/v1beta/files",
        headers={
            "x-goog-api-key": KEYS[SCOPE],
            "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start",
            "x-goog-upload-header-content-length": "3",
            "x-goog-upload-header-content-type": "text/plain",
        },
        json={"file": {"display_name": "t"}},
    )
    assert r.status_code == 200
    assert r.headers["x-goog-upload-url"].startswith(f"{gw.url}/upload/v1beta/files?upload_id=")
    done = httpx.post(
        r.headers["x-goog-upload-url"],
        headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
        content=b"abc",
    )
    assert done.status_code == 200 and done.json()["file"]["sizeBytes"] == "3"


def test_upload_session_urls_cannot_be_forged(gw: Gateway) -> None:
    """Without a key, only an upload session the gateway itself opened is accepted."""
    r = httpx.post(
        f"{gw.url}/upload/v1beta/files?upload_id=forged&upload_protocol=resumable",
        headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
        content=b"abc",
    )
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    ("path", "family", "shape"),
    [
        ("/v1/organization/admin_api_keys", "openai", lambda b: b["error"]["type"] == "permission_error"),
        ("/v1/organizations/api_keys", "anthropic", lambda b: b["error"]["type"] == "permission_error"),
    ],
)
def test_organisation_administration_is_never_forwarded(gw: Gateway, simulator, path, family, shape) -> None:  # type: ignore[no-untyped-def]
    seen = len(simulator.app.received)
    headers = gw.headers(SCOPE) | ({"anthropic-version": "2023-06-01"} if family == "anthropic" else {})
    r = httpx.get(f"{gw.url}{path}", headers=headers)
    assert r.status_code == 403 and shape(r.json())
    assert len(simulator.app.received) == seen


def test_anthropic_batch_results_url_is_the_gateways(gw: Gateway) -> None:
    client = ant(gw)
    batch = client.messages.batches.create(
        requests=[
            {
                "custom_id": "a",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            }
        ]
    )
    assert batch.results_url is None
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.results_url == f"{gw.url}/v1/messages/batches/{batch.id}/results"
    assert all(b.results_url is None or b.results_url.startswith(gw.url) for b in client.messages.batches.list())
    results = list(client.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == ["a"] and results[0].result.type == "succeeded"


def _bytes_file(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def _open_upload(gw: Gateway) -> str:
    r = httpx.post(
        f"{gw.url}/upload/v1beta/files",
        headers={
            "x-goog-api-key": KEYS[SCOPE],
            "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start",
            "x-goog-upload-header-content-type": "text/plain",
        },
        json={"file": {"display_name": "t"}},
    )
    assert r.status_code == 200
    return str(r.headers["x-goog-upload-url"])


def test_an_upload_id_opens_its_own_session_and_nothing_else(gw: Gateway, simulator: SimulatorThread) -> None:
    """The upload id authenticates key-less chunks of that upload only: not another path, not another method,
    not a new session, and not after the upload is finalised."""
    url = _open_upload(gw)
    upload_id = url.split("upload_id=")[1].split("&")[0]
    seen = len(simulator.app.received)
    chunk = {"x-goog-upload-command": "upload", "x-goog-upload-offset": "0"}
    for method, path, headers in (
        ("POST", f"/upload/v1beta/fileSearchStores/s1:uploadToFileSearchStore?upload_id={upload_id}", chunk),
        ("POST", f"/upload/v1beta/anything/else?upload_id={upload_id}", chunk),
        ("GET", f"/upload/v1beta/files?upload_id={upload_id}", chunk),
        ("POST", f"/upload/v1beta/files?upload_id={upload_id}", {"x-goog-upload-command": "start"}),
    ):
        r = httpx.request(method, f"{gw.url}{path}", headers=headers, content=b"abc")
        assert r.status_code == 401, (method, path, r.status_code)
    assert len(simulator.app.received) == seen
    done = httpx.post(
        url, headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"}, content=b"abc"
    )
    assert done.status_code == 200
    again = httpx.post(
        url, headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"}, content=b"abc"
    )
    assert again.status_code == 401  # the session ended with the upload


def test_client_chosen_organisation_and_project_headers_are_not_forwarded(
    gw: Gateway, simulator: SimulatorThread
) -> None:
    client = openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=KEYS[SCOPE], max_retries=0, organization="org-other", project="proj_other"
    )
    client.files.list()
    seen = simulator.app.received[-1].headers
    assert "openai-organization" not in seen and "openai-project" not in seen
