"""The prompt token ids a replica will see for an OpenAI request body, computed router-side for prefix matching."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("pagedllm.router.prompt_tokens")


class PromptTokenizer:
    """Renders chat messages with the model's template and tokenizes exactly as ``pagedllm serve`` does.

    A body it cannot render (no template, a template error, odd content) yields None: the request is
    then routed by load alone and the replica reports the real error.
    """

    def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def for_model(cls, model: str | None, chat_template: str | None = None) -> PromptTokenizer:
        from pagedllm.config import ModelConfig
        from pagedllm.model.loader import load_tokenizer

        info = load_tokenizer(ModelConfig(model=model, chat_template=chat_template))
        return cls(info.tokenizer, chat_template or info.chat_template)

    def prompt_ids(self, path: str, body: dict) -> list[int] | None:
        try:
            if path.endswith("chat/completions"):
                return self._chat_ids(body)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]  # a batch of prompts: route by the first
            if isinstance(prompt, str):
                return list(self.tokenizer.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True))))
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return prompt
        except Exception as exc:  # routing must not fail a request the replica may well accept
            logger.debug("could not tokenize the prompt for routing: %s", exc)
        return None

    def _chat_ids(self, body: dict) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or self.chat_template is None:
            return None
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text parts joined, as the server does
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            msgs.append({"role": m.get("role"), "content": content or ""})
        text = self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            chat_template=self.chat_template,
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))
