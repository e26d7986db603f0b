"""GET /tokenizer_info (behind --enable-tokenizer-info-endpoint, as in vLLM): the tokenizer's configuration
as JSON, so a client such as lm-evaluation-harness (tokenizer_backend=remote) can work with no local copy
of a tokenizer that may live only inside a GGUF file."""

from __future__ import annotations

import json
from typing import Any

# Paths on the server's disk and objects that say nothing to a remote client.
_OMITTED = {"vocab_file", "merges_file", "tokenizer_file", "tokenizer_object", "name_or_path", "added_tokens_decoder"}
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _jsonable(value: Any) -> Any:
    """JSON-safe form of an init kwarg (AddedToken -> its text); None when it has none."""
    content = getattr(value, "content", None)
    if isinstance(content, str):
        return content
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _jsonable(v)) for k, v in value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def tokenizer_info_response(tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    """The tokenizer's init kwargs (JSON-safe), its special tokens as text, its class and the chat template."""
    info: dict[str, Any] = {}
    for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items():
        if key not in _OMITTED and (converted := _jsonable(value)) is not None:
            info[key] = converted
    for key in _SPECIAL:  # always present (null when the tokenizer has none): clients test for the keys
        token = getattr(tokenizer, key, None)
        info[key] = token if isinstance(token, str) else _jsonable(token)
    info["tokenizer_class"] = type(tokenizer).__name__
    if chat_template:
        info["chat_template"] = chat_template
    return info
