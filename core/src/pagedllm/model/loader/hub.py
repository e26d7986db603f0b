"""Hugging Face Hub model names (``org/name``, ``org/name:Q4_K_M``, ``org/name:file.gguf``) resolved to
local paths through huggingface_hub: its cache first, a download (with progress) only when online.
``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself."""

from __future__ import annotations

import os
import re

from pagedllm.errors import ModelLoadError

# What an HF model directory needs; never the duplicate PyTorch/TF/Flax/ONNX/GGUF weights beside it.
_HF_DIR_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def split_hub_name(model: str) -> tuple[str, str | None] | None:
    """(repo_id, GGUF file or quant) if ``model`` is spelled like a hub name and is not a local path."""
    if os.path.exists(os.path.expanduser(model)) or model.startswith((".", "/", "~")):
        return None
    repo_id, _, gguf = model.partition(":")
    if not _REPO_ID.match(repo_id) or repo_id.count("/") != 1:
        return None
    return repo_id, (gguf or None)


def _pick_gguf(files: list[str], wanted: str | None, repo_id: str) -> str:
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if wanted is not None:
        if wanted.endswith(".gguf"):
            matches = [f for f in ggufs if f == wanted or os.path.basename(f) == wanted]
        else:  # a quant name, as llama.cpp's -hf repo:Q4_K_M: the file whose name carries it
            pattern = re.compile(rf"(^|[-._/]){re.escape(wanted)}([-._]|$)", re.IGNORECASE)
            matches = [f for f in ggufs if pattern.search(os.path.basename(f)[: -len(".gguf")])]
            matches = [f for f in matches if "mmproj" not in os.path.basename(f).lower()]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ModelLoadError(f"{repo_id} has no GGUF file matching {wanted!r}; its GGUF files: "
                                 f"{', '.join(ggufs) or 'none'}")
        raise ModelLoadError(f"{wanted!r} matches several GGUF files in {repo_id} ({', '.join(matches)}); "
                             "name one file")
    if len(ggufs) == 1:
        return ggufs[0]
    raise ModelLoadError(f"{repo_id} has no config.json and several GGUF files ({', '.join(ggufs)}); "
                         f"pick one as {repo_id}:QUANT (e.g. :Q4_K_M) or {repo_id}:FILE.gguf")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _missing(repo_id: str, revision: str | None, why: str) -> ModelLoadError:
    from huggingface_hub import constants

    rev = f" at revision {revision}" if revision else ""
    if _offline():
        return ModelLoadError(f"model {repo_id}{rev} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                              "and HF_HUB_OFFLINE=1 forbids downloading it")
    return ModelLoadError(f"model {repo_id}{rev} could not be fetched from the Hugging Face Hub: {why}")


def _repo_files(repo_id: str, revision: str | None) -> tuple[list[str], str | None]:
    """The repository's file names, and the cached snapshot folder when offline."""
    from huggingface_hub import HfApi, snapshot_download

    if _offline():
        # The whole cached snapshot, without touching the network.
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
        files = [os.path.relpath(os.path.join(root, f), folder)
                 for root, _, names in os.walk(folder) for f in names]
        return files, folder
    return HfApi().list_repo_files(repo_id, revision=revision), None


def resolve_hub_model(model: str, revision: str | None = None) -> str:
    """A local HF directory or GGUF file for a hub name; raises ModelLoadError (one line) if there is none."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    parts = split_hub_name(model)
    if parts is None:
        raise ModelLoadError(f"{model!r} is not a Hugging Face repository id (org/name[:QUANT])")
    repo_id, gguf = parts
    try:
        files, folder = _repo_files(repo_id, revision)
        if gguf is None and "config.json" in files:
            if folder is not None:
                return folder
            return snapshot_download(repo_id, revision=revision, allow_patterns=_HF_DIR_PATTERNS)
        name = _pick_gguf(files, gguf, repo_id)
        if folder is not None:
            return os.path.join(folder, name)
        return hf_hub_download(repo_id, name, revision=revision)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, FileNotFoundError) as exc:
        raise _missing(repo_id, revision, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
    except OSError as exc:  # network errors (requests/httpx) are OSErrors
        first_line = (str(exc).splitlines() or [""])[0]
        raise _missing(repo_id, revision, f"{type(exc).__name__}: {first_line}") from None
