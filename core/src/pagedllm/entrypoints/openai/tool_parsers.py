"""Tool-call parsers for tool_choice "auto": find the calls a model wrote in its own format.

``hermes``: Hermes / Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.
``llama3_json``: Llama 3's ``{"name": ..., "parameters": {...}}`` objects (``;``-separated, after an
optional ``<|python_tag|>``). A block that does not parse, or names no known tool, stays text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from pagedllm.entrypoints.openai.structured_request import FunctionCall, ToolCall


@dataclass(slots=True)
class ParsedToolCalls:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


class ToolParser:
    name: str
    # Text that may open a tool call: a stream holds back text that could be its start.
    start_marker: str

    def __init__(self, tool_names: list[str]) -> None:
        self.tool_names = set(tool_names)

    def parse(self, text: str) -> ParsedToolCalls:
        raise NotImplementedError

    def _call(self, obj: object, args_key: str) -> ToolCall | None:
        if not isinstance(obj, dict) or obj.get("name") not in self.tool_names:
            return None
        args = obj.get(args_key, obj.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(function=FunctionCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False)))

    def stream_start(self, text: str) -> int | None:
        """Where a tool call starts in ``text`` (None if none has): text before it may be streamed."""
        i = text.find(self.start_marker)
        return None if i < 0 else i


class HermesToolParser(ToolParser):
    name = "hermes"
    start_marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedToolCalls:
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedToolCalls(text)
        calls = []
        for m in self._block.finditer(text, start):
            try:
                obj = json.loads(m.group(1))
            except ValueError:
                continue
            call = self._call(obj, "arguments")
            if call is not None:
                calls.append(call)
        if not calls:
            return ParsedToolCalls(text)
        content = text[:start].strip()
        return ParsedToolCalls(content or None, calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_marker = "{"
    _tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedToolCalls:
        body = text.strip()
        if body.startswith(self._tag):
            body = body[len(self._tag):].lstrip()
        if not body.startswith("{"):
            return ParsedToolCalls(text)
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return ParsedToolCalls(text)
            call = self._call(obj, "parameters")
            if call is None:
                return ParsedToolCalls(text)
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ParsedToolCalls(None, calls)

    def stream_start(self, text: str) -> int | None:
        # A Llama 3 call is the whole message: decide from its first non-space characters.
        body = text.lstrip()
        if body.startswith(self._tag) or body.startswith("{"):
            return 0
        return None


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}
