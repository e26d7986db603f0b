"""lm-evaluation-harness scores a multiple-choice task against `pagedllm serve` of a GGUF (the only
copy of the tokenizer is inside it) through `tokenizer_backend=remote`, and every log-likelihood it
reports matches transformers' own on the original HF weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch
from openai_server import RemoteServer, tiny_model_dir

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "One, two,", "choices": [" three", " seven"], "answer": 0},
    {"question": "Cats say", "choices": [" meow", " woof", " moo", " quack"], "answer": 0},
    {"question": "Water is ", "choices": ["wet", "dry"], "answer": 0},  # trailing space moves to the choice
    {"question": "Hello", "choices": [" world", "!", " there friend"], "answer": 1},
]
TASK = """\
task: pagedllm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pagedllm.model.testing import write_tiny_gguf

    root = tmp_path_factory.mktemp("lm-eval")
    hf_dir = tiny_model_dir(str(root))
    gguf = write_tiny_gguf(hf_dir, root / "tiny-f32.gguf")  # F32: the same weights as the HF checkpoint
    return hf_dir, gguf


def test_tokenizer_info_is_served_only_when_enabled(models):
    _, gguf = models
    srv = RemoteServer(gguf, ["--dtype", "float32", "--num-gpu-blocks-override", "64"])
    try:
        assert httpx.get(f"{srv.url}/tokenizer_info", timeout=30).status_code == 404  # as in vLLM: opt-in
    finally:
        srv.stop()


def _transformers_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's split of a (context, continuation) pair, scored by transformers in fp64."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_lm_eval_scores_a_multiple_choice_task_matching_transformers(models, tmp_path):
    import transformers

    hf_dir, gguf = models
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pagedllm_tiny_mc.yaml").write_text(TASK.format(data=data))
    srv = RemoteServer(gguf, ["--dtype", "float32", "--num-gpu-blocks-override", "128",
                              "--served-model-name", "tiny", "--enable-tokenizer-info-endpoint"])
    try:
        info = httpx.get(f"{srv.url}/tokenizer_info", timeout=30).json()
        assert "eos_token" in info and info["tokenizer_class"] and info["chat_template"]
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model=tiny,base_url={srv.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,"
               "max_retries=1", "--tasks", "pagedllm_tiny_mc", "--include_path", str(tasks),
               "--output_path", str(out), "--log_samples"]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        srv.stop()
    samples = [json.loads(line) for f in out.rglob("samples_pagedllm_tiny_mc_*.jsonl") for line in f.open()]
    assert len(samples) == len(DOCS)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    compared = 0
    for sample in samples:
        args = sample["arguments"]  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        pairs = [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else args
        for (context, continuation), resp in zip(pairs, sample["resps"], strict=True):
            served = float(resp[0][0])
            expected = _transformers_loglikelihood(model, tokenizer, context, continuation)
            assert abs(served - expected) < 1e-4, (context, continuation, served, expected)
            compared += 1
    assert compared == sum(len(d["choices"]) for d in DOCS)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["pagedllm_tiny_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0
