"""Tool calls of a chat choice: read from the generated text by tool mode, whole or as stream deltas.

"named": the text is the arguments (a schema made it so); "required": the text is a JSON array of
{"name", "parameters"} (a schema made it so); "auto": a tool parser finds the calls in the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pagedllm.entrypoints.openai.structured_request import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    ToolMode,
)
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolParser
from pagedllm.errors import InvalidRequestError


def make_parser(mode: ToolMode, enable_auto: bool, parser_name: str | None) -> ToolParser | None:
    """The parser for tool_choice "auto" (a 400 when the server was not started to allow it)."""
    if mode.kind != "auto":
        return None
    if not enable_auto or parser_name is None:
        raise InvalidRequestError(
            '"auto" tool choice requires the server to run with --enable-auto-tool-choice and --tool-call-parser; '
            "pass tool_choice 'none', 'required' or a named function instead",
            param="tool_choice",
        )
    return TOOL_PARSERS[parser_name](mode.function_names())


def complete(mode: ToolMode, parser: ToolParser | None, text: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of a finished choice."""
    if mode.kind == "named":
        return None, [ToolCall(function=FunctionCall(name=mode.name, arguments=text))]
    if mode.kind == "required":
        try:
            items = json.loads(text)
        except ValueError:  # cut short by max_tokens: the partial array is returned as text
            return text, None
        return None, [
            ToolCall(function=FunctionCall(name=it["name"], arguments=json.dumps(it["parameters"], ensure_ascii=False)))
            for it in items
        ]
    if parser is not None:
        parsed = parser.parse(text)
        return parsed.content, parsed.calls or None
    return text, None


def finish_reason(mode: ToolMode, calls: list[ToolCall] | None, reason: str | None) -> str | None:
    """OpenAI says "tool_calls" when the model chose to call (auto / required); a forced named call stops."""
    if calls and reason == "stop" and mode.kind in ("auto", "required"):
        return "tool_calls"
    return reason


@dataclass(slots=True)
class ToolCallStream:
    """One streamed choice: turns its text deltas into content and OpenAI tool-call deltas."""

    mode: ToolMode
    parser: ToolParser | None
    text: str = ""
    sent_content: int = 0
    sent_args: int = 0
    call_id: str | None = None
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, new_text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        """(content to send, tool-call deltas to send) after ``new_text``."""
        self.text += new_text
        if self.mode.kind == "named":
            # The arguments stream as they are generated; the first delta also names the call.
            args = self.text[self.sent_args:]
            self.sent_args = len(self.text)
            if self.call_id is None:
                call = ToolCall(function=FunctionCall(name=self.mode.name, arguments=""))
                self.call_id = call.id
                self.calls.append(call)
                return "", [DeltaToolCall(index=0, id=call.id, type="function",
                                          function=DeltaFunctionCall(name=self.mode.name, arguments=args))]
            return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=args))] if args else []
        if self.mode.kind == "required" or self.parser is not None:
            if self.mode.kind == "auto":
                start = self.parser.stream_start(self.text)
                if start is None:
                    # Hold back a tail that could be the start of the parser's opening marker.
                    limit = len(self.text) if finished else len(self.text) - _partial_marker(self.text, self.parser.start_marker)
                    return self._content(limit), []
                if not finished:
                    return self._content(start), []
            elif not finished:
                return "", []
            _, calls = complete(self.mode, self.parser, self.text)
            if not calls:
                return self._content(len(self.text)), []
            self.calls = calls
            deltas = [
                DeltaToolCall(index=i, id=c.id, type="function",
                              function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                for i, c in enumerate(calls)
            ]
            return "", deltas
        return self._content(len(self.text)), []

    def _content(self, limit: int) -> str:
        out = self.text[self.sent_content:limit]
        self.sent_content = max(self.sent_content, limit)
        return out


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest proper prefix of ``marker`` that ``text`` ends with."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
