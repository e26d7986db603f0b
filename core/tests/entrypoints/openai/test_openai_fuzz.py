"""Fuzzing every endpoint of a real `pagedllm serve` (a tiny random Llama) with schemathesis, from the
server's own OpenAPI schema: no input may get a 5xx, and the engine is alive and serving afterwards.
The default suite runs a bounded number of cases per endpoint; `-m slow` runs many more."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from openai_server import RemoteServer, tiny_model_dir

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_model_dir(str(tmp_path_factory.mktemp("model")))
    srv = RemoteServer(model, ["--dtype", "float32", "--num-gpu-blocks-override", "256", "--max-num-seqs", "8",
                               "--served-model-name", "tiny", "--enable-tokenizer-info-endpoint",
                               "--disable-uvicorn-access-log"])
    yield srv
    srv.stop()


def _fuzz(srv: RemoteServer, examples: int) -> dict[str, int]:
    raw = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    counts: dict[str, int] = {}
    failures: list[str] = []
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            _fuzz_operation(srv, client, operation, examples, counts, failures)
    assert not failures, failures
    return counts


def _fuzz_operation(srv: RemoteServer, client: httpx.Client, operation, examples: int, counts: dict[str, int],
                    failures: list[str]) -> None:
    name = f"{operation.method.upper()} {operation.path}"
    counts[name] = 0
    # Schema-valid requests and schema-violating ones (wrong types, missing fields, ...).
    strategy = operation.as_strategy() | operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        kwargs = case.as_transport_kwargs(base_url=srv.url)
        # Keep generation short: the fuzzer is after the request layer, not long outputs.
        body = kwargs.get("json")
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 16:
            body["max_tokens"] = 16
        response = client.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                                  params=kwargs.get("params"), json=body, content=kwargs.get("data"))
        counts[name] += 1
        if response.status_code >= 500:
            failures.append(f"{name} {response.status_code}: {body!r:.300} -> {response.text[:300]}")
            raise AssertionError(failures[-1])

    check()


def _engine_still_serves(srv: RemoteServer) -> None:
    assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "still alive", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert srv.proc.poll() is None


def test_fuzzed_requests_to_every_endpoint_never_get_a_5xx(server):
    counts = _fuzz(server, examples=12)
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models/{model_id}",
                 "/tokenizer_info", "/health", "/metrics"):
        assert any(name.endswith(" " + path) and n > 0 for name, n in counts.items()), (path, counts)
    _engine_still_serves(server)


@pytest.mark.slow
def test_many_fuzzed_requests_to_every_endpoint_never_get_a_5xx(server):
    _fuzz(server, examples=300)
    _engine_still_serves(server)
