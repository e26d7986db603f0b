"""Under 4x max_num_seqs concurrent load with a small waiting queue, every request either completes
or is refused with 429 + Retry-After: none lost, none hanging."""

import asyncio

import httpx
import pytest
from openai_server import RemoteServer, tiny_model_dir

MAX_NUM_SEQS = 4
MAX_WAITING = 4


@pytest.mark.slow
def test_overload_every_request_completes_or_gets_429(tmp_path):
    model = tiny_model_dir(str(tmp_path))
    server = RemoteServer(model, ["--dtype", "float32", "--num-gpu-blocks-override", "256",
                                  "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING)])
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                         limits=httpx.Limits(max_connections=64)) as c:

                async def one(i: int, stream: bool):
                    body = {"prompt": f"load {i}", "max_tokens": 64, "ignore_eos": True, "stream": stream}
                    if not stream:
                        r = await c.post("/v1/completions", json=body)
                        return r.status_code, r.headers.get("retry-after"), r.json()
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                        if r.status_code != 200:
                            return r.status_code, r.headers.get("retry-after"), None
                        return r.status_code, None, lines

                n = 4 * MAX_NUM_SEQS * 2  # 4x max_num_seqs, twice over: streaming and not
                return await asyncio.gather(*(one(i, i % 2 == 0) for i in range(n)))

        results = asyncio.run(main())
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429}
        assert statuses.count(429) > 0 and statuses.count(200) >= MAX_NUM_SEQS + MAX_WAITING
        for status, retry_after, payload in results:
            if status == 429:
                assert retry_after == "1"
            elif isinstance(payload, dict):
                assert payload["choices"][0]["finish_reason"] == "length"
            else:
                assert payload[-1] == "data: [DONE]" and '"finish_reason":"length"' in payload[-2]
        # after the burst the server admits again
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                          timeout=60).status_code == 200
    finally:
        assert server.stop() == 0
