"""The OpenAI-compatible server end to end: a real `pagedllm serve` of a tiny random Llama, driven by
the official openai client and raw HTTP. The last test stops the server with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai_server import RemoteServer, children_of, pid_alive, tiny_model_dir

API_KEY = "test-key-123"
MAX_NUM_SEQS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_model_dir(str(tmp_path_factory.mktemp("model")))
    srv = RemoteServer(model, ["--dtype", "float32", "--num-gpu-blocks-override", "512", "--max-num-seqs",
                               str(MAX_NUM_SEQS), "--served-model-name", "tiny", "--shutdown-timeout", "60"],
                       api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def _post(server, path, body=None, **kw):
    headers = {**server.headers, **kw.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_reports_usage_and_finish_reason(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len("Hello")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_streamed_and_non_streamed_greedy_text_are_identical(client):
    kw = dict(model="tiny", prompt="The sky is", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full
    msgs = [{"role": "user", "content": "hi"}]
    chat_full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_full


def test_chat_uses_the_model_template_and_counts_its_tokens(server, client):
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0)
    tok = _post(server, "/tokenize", {"messages": msgs}).json()
    assert r.usage.prompt_tokens == tok["count"] > len("hi")  # the ChatML wrapping is in the prompt
    assert r.choices[0].message.role == "assistant"


def test_n_samples_and_seed_reproducibility(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=6, temperature=1.0, n=2, seed=7,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 12


def test_stop_string_truncates_in_both_modes(client):
    kw = dict(model="tiny", prompt="Hello", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[3:5]
    assert stop  # greedy output of the random model is long enough to pick a stop from
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw)
                       if c.choices)
    assert streamed == r.choices[0].text


def test_logprobs_shapes_for_completions_and_chat(client):
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) >= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_echo_and_include_usage_in_stream(client):
    r = client.completions.create(model="tiny", prompt="Echo me", max_tokens=2, temperature=0, echo=True,
                                  logprobs=1, extra_body={"ignore_eos": True})
    assert r.choices[0].text.startswith("Echo me")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len("Echo me") + 2  # prompt tokens (byte-level), then the generated ones
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    chunks = list(client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(client):
    """lm-evaluation-harness's log-likelihood request: prompt in, prompt logprobs out, no tokens."""
    prompts = ["Score me", "and me too"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=1, n=2)
    assert [c.text for c in r.choices] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert r.usage.completion_tokens == 0 and all(c.finish_reason == "length" for c in r.choices)
    generating = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=2, echo=True, logprobs=1,
                                           temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompts[0])  # byte-level tiny tokenizer: one token per character
    assert lp.token_logprobs == generating.choices[0].logprobs.token_logprobs[: len(lp.tokens)]
    chunks = list(client.completions.create(model="tiny", prompt=prompts[0], max_tokens=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompts[0]
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="only with echo"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)


def test_tokenize_detokenize_version(server):
    tok = _post(server, "/tokenize", {"prompt": "hello"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] > 0
    assert _post(server, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"] == "hello"
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_api_key_is_required_on_v1_but_not_on_health_and_metrics(server):
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


BAD_REQUESTS = [
    ("/v1/completions", {}),  # missing prompt
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}),
    ("/v1/completions", {"prompt": "x", "top_p": 0}),
    ("/v1/completions", {"prompt": "x", "top_k": -7}),
    ("/v1/completions", {"prompt": "x", "n": 0}),
    ("/v1/completions", {"prompt": "x", "n": 100000}),
    ("/v1/completions", {"prompt": "x", "logprobs": 1000}),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 5}}),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9]}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": [10**9]}),
    ("/v1/completions", {"prompt": [-1]}),
    ("/v1/completions", {"prompt": "x" * 5000}),  # longer than the context
    ("/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "alien", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9}),
    ("/tokenize", {}),
    ("/detokenize", {"tokens": [10**9]}),
]


@pytest.mark.parametrize("path, body", BAD_REQUESTS, ids=[f"{p}:{json.dumps(b)[:40]}" for p, b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_in_openai_shape(server, path, body):
    r = _post(server, path, body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_nan_malformed_json_invalid_utf8_unknown_model_and_oversized_body(server):
    h = {**server.headers, "Content-Type": "application/json"}
    cases = [
        (b'{"prompt": "x", "temperature": NaN}', 400),
        (b'{"prompt": "x", "top_p": Infinity}', 400),
        (b'{"prompt": ', 400),
        (b'{"prompt": "\xff\xfe"}', 400),
        (b'[1, 2]', 400),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
        (b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}', 413),
    ]
    for raw, status in cases:
        r = httpx.post(f"{server.url}/v1/completions", content=raw, headers=h, timeout=60)
        assert r.status_code == status, (raw[:40], r.text[:200])
        assert r.json()["error"]["message"]


def test_server_still_serves_and_never_returned_5xx_after_bad_input(server, client):
    r = client.completions.create(model="tiny", prompt="still alive", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None
    assert server.metric('pagedllm:request_success_total{finished_reason="error",model_name="tiny"}') == 0


async def _storm(server, n: int, client_timeout_s: float) -> int:
    """n streaming requests whose clients each hang up mid-stream: after their third streamed chunk,
    or client_timeout_s after being sent, whichever comes first; returns how many hung up before the
    stream's end.

    A client hangs up only once its response has started (its request was admitted), so every
    request exercises the abort path; one whose headers come after the deadline hangs up at once.
    Hanging up after a few chunks (not only on the clock) keeps a request from finishing its 240
    tokens first on a fast host, which a clock alone cannot promise.
    """
    body = {"model": "tiny", "prompt": "storm", "max_tokens": 240, "stream": True, "ignore_eos": True}
    hung_up = 0
    async with httpx.AsyncClient(headers=server.headers, timeout=120,
                                 limits=httpx.Limits(max_connections=n)) as c:

        async def one(i: int) -> None:
            nonlocal hung_up
            deadline = time.monotonic() + client_timeout_s
            async with c.stream("POST", f"{server.url}/v1/completions", json={**body, "seed": i}) as r:
                assert r.status_code == 200

                async def consume() -> bool:  # True: the client stopped before the stream's end
                    chunks = 0
                    async for line in r.aiter_lines():
                        if line.strip() == "data: [DONE]":
                            return False
                        chunks += line.startswith("data: ")
                        if chunks >= 3:
                            return True
                    return False

                try:  # (the await first: += would read the count before it, losing its neighbours' updates)
                    stopped = await asyncio.wait_for(consume(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    stopped = True
                hung_up += stopped

        await asyncio.gather(*(one(i) for i in range(n)))
    return hung_up


def _check_recovers_after_storm(server, client):
    t0 = time.monotonic()
    r = client.completions.create(model="tiny", prompt="after", max_tokens=3, temperature=0, timeout=30)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert time.monotonic() - t0 < 5.0, "a new request must complete within 5 s after the storm"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if server.metric("pagedllm:kv_cache_usage_perc") == 0.0 and server.metric("pagedllm:num_requests_running") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("KV cache usage did not return to zero after the cancelled requests")


ABORTS = 'pagedllm:request_success_total{finished_reason="abort",model_name="tiny"}'


def _wait_for_aborts(server, at_least: float) -> None:
    deadline = time.monotonic() + 10
    while server.metric(ABORTS) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric(ABORTS) >= at_least, "client disconnects must abort their requests"


def test_cancellation_storm_frees_everything(server, client):
    aborts = server.metric(ABORTS)
    timeouts = asyncio.run(_storm(server, 30, 0.5))
    assert timeouts == 30  # every client hung up mid-stream
    _wait_for_aborts(server, aborts + 30)
    _check_recovers_after_storm(server, client)


@pytest.mark.slow
def test_cancellation_storm_of_200_frees_everything(server, client):
    aborts = server.metric(ABORTS)
    assert asyncio.run(_storm(server, 200, 0.5)) == 200
    _wait_for_aborts(server, aborts + 200)
    _check_recovers_after_storm(server, client)


def test_non_streaming_disconnect_aborts_the_request(server, client):
    aborts = server.metric(ABORTS)
    # Long enough to be running when the client gives up: 4 samples x 250 tokens with logprobs is
    # well over the 0.1 s timeout even with captured decode steps of the tiny model (~1 ms each).
    body = {"model": "tiny", "prompt": "x", "max_tokens": 250, "ignore_eos": True, "n": 4, "logprobs": 5}
    with pytest.raises(httpx.TimeoutException):
        _post(server, "/v1/completions", body, timeout=0.1)
    _wait_for_aborts(server, aborts + 1)
    _check_recovers_after_storm(server, client)


@pytest.mark.slow
def test_64_concurrent_streaming_clients_all_complete(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)

        async def one(i):
            stream = await c.completions.create(model="tiny", prompt=f"client {i}", max_tokens=16, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
            finish, text = None, ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
            return finish

        return await asyncio.gather(*(one(i) for i in range(64)))

    assert asyncio.run(main()) == ["length"] * 64


def test_bench_serve_measures_latencies_and_writes_json_and_plot(server, tmp_path):
    import argparse

    from pagedllm.bench import serve as bench

    parser = bench.add_cli_args(argparse.ArgumentParser())
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    args = parser.parse_args(["--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "6",
                              "--input-len", "12", "--output-len", "5", "--max-concurrency", "3",
                              "--result-json", str(out_json), "--plot", str(out_png)])
    assert bench.main(args) == 0
    result = json.loads(out_json.read_text())
    summary = result["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 6 * 12  # /tokenize made the prompts exactly --input-len
    assert summary["total_output_tokens"] == 6 * 5
    assert 0 < summary["ttft_ms"]["median"] <= summary["e2e_ms"]["p99"]
    assert summary["tpot_ms"]["mean"] > 0 and out_png.stat().st_size > 1000


def test_bench_serve_refuses_non_loopback_targets():
    import argparse

    from pagedllm.bench import serve as bench

    args = bench.add_cli_args(argparse.ArgumentParser()).parse_args(["--base-url", "http://10.1.2.3:8000"])
    with pytest.raises(SystemExit, match="loopback"):
        bench.main(args)


def _maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line for line in f)


def test_the_api_server_process_never_loads_torch(server, client):
    # After every kind of request above (chat, logprobs, echo, tokenize, streams, cancellations):
    # only the engine process computes; the frontend's copy of torch would be ~200 MiB of RSS.
    client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=2)
    assert _maps_torch(server.engine_pid)
    assert not _maps_torch(server.proc.pid)


def test_sigterm_drains_in_flight_requests_and_leaves_no_child(server):
    """Runs last: stops the module's server."""
    import signal

    engine_pid = server.engine_pid
    assert children_of(server.proc.pid) == [engine_pid]
    # As long as the tiny model allows (max_model_len 256): still running when the late request
    # arrives, on a fast machine too. Admission stops inside the signal handler itself.
    body = {"model": "tiny", "prompt": "drain", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers,
                      timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.005)  # the signal is delivered asynchronously
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "late"},
                             headers=server.headers, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        rest = [line for line in lines if line.startswith("data: ")]
    chunks = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(engine_pid)
