"""Stream deltas never retract text, iterators merge and clean up, middlewares guard the app."""

import asyncio

import httpx
from fastapi import FastAPI, Request
from pagedllm.entrypoints.openai.api_server import ApiKeyMiddleware, BodySizeLimitMiddleware
from pagedllm.entrypoints.openai.serving_common import ChoiceStream, merge_async_iterators, stop_holdback
from pagedllm.outputs import CompletionOutput


def _out(text, n_tokens, finish=None):
    return CompletionOutput(index=0, text=text, token_ids=list(range(n_tokens)), finish_reason=finish)


def test_stream_holds_back_possible_stop_prefix_so_truncation_never_retracts_text():
    st = ChoiceStream(holdback=stop_holdback(["STOP"]))
    sent = ""
    for text, n in (("Hello S", 2), ("Hello ST", 3), ("Hello STO", 4)):
        delta, _, _ = st.delta(_out(text, n))
        sent += delta
    assert "S" not in sent and "Hello ".startswith(sent)
    delta, _, _ = st.delta(_out("Hello ", 5, finish="stop"))  # the engine cut "STOP"
    sent += delta
    assert sent == "Hello "


def test_stream_without_stop_strings_sends_everything_at_once():
    st = ChoiceStream(holdback=stop_holdback([]))
    assert st.delta(_out("ab", 2)) == ("ab", 0, 2)
    assert st.delta(_out("abcd", 3)) == ("cd", 2, 3)


def test_merge_async_iterators_interleaves_and_closes_unfinished_ones():
    closed = []

    async def gen(name, n):
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield f"{name}{i}"
        finally:
            closed.append(name)

    async def main():
        got = []
        async for i, item in merge_async_iterators([gen("a", 3), gen("b", 1000)]):
            got.append((i, item))
            if len(got) == 4:
                break
        await asyncio.sleep(0)
        return got

    got = asyncio.run(main())
    assert len(got) == 4 and {i for i, _ in got} == {0, 1}
    assert "b" in closed  # the abandoned iterator ran its finally (where requests get aborted)


def _app(**mw):
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    @app.get("/health")
    async def health():
        return {}

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=mw.get("max_bytes", 100))
    if "api_key" in mw:
        app.add_middleware(ApiKeyMiddleware, api_key=mw["api_key"])
    return app


async def _call(app, method, path, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kw)


def test_body_over_limit_is_413_in_openai_shape_and_under_limit_passes():
    app = _app(max_bytes=100)
    r = asyncio.run(_call(app, "POST", "/v1/echo", content=b"x" * 101))
    assert r.status_code == 413 and r.json()["error"]["code"] is None  # OpenAI: a string or null
    r = asyncio.run(_call(app, "POST", "/v1/echo", content=b"x" * 100))
    assert r.status_code == 200 and r.json() == {"n": 100}


def test_chunked_body_over_limit_is_413():
    async def body():
        for _ in range(5):
            yield b"y" * 30

    r = asyncio.run(_call(_app(max_bytes=100), "POST", "/v1/echo", content=body()))
    assert r.status_code == 413


def test_api_key_guards_v1_routes_only():
    app = _app(api_key="sekret")
    assert asyncio.run(_call(app, "POST", "/v1/echo", content=b"{}")).status_code == 401
    bad = asyncio.run(_call(app, "POST", "/v1/echo", content=b"{}", headers={"Authorization": "Bearer nope"}))
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    ok = asyncio.run(_call(app, "POST", "/v1/echo", content=b"{}", headers={"Authorization": "Bearer sekret"}))
    assert ok.status_code == 200
    assert asyncio.run(_call(app, "GET", "/health")).status_code == 200
