"""What a request asks its output to match: response_format, structured_outputs, guided_*, and tools.

Turns the OpenAI / vLLM request fields into one StructuredOutputsParams (or none), and holds the
tool-call records of responses. Every malformed field is an InvalidRequestError (HTTP 400).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from pagedllm.errors import InvalidRequestError
from pagedllm.structured.params import StructuredOutputsParams

_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar"))


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: str = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


@dataclass(slots=True)
class ToolMode:
    """How a chat request uses its tools: "none", "auto" (the model decides; a parser finds the
    calls), "required" (at least one call, constrained by a schema) or "named" (that function)."""

    kind: str
    tools: list[dict[str, Any]]
    name: str | None = None

    def function_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of function tools", param="tools")
    names: set[str] = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                param="tools",
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"tools[{i}].function.name must be a non-empty string", param="tools")
        if name in names:
            raise InvalidRequestError(f"tools has two functions named {name!r}", param="tools")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    return tools


def tool_mode(req: Any) -> ToolMode:
    """The request's tool mode; unknown tool names and malformed choices are 400s."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return ToolMode("none", [])
    tools = _check_tools(tools)
    if choice is None:
        choice = "auto"
    if choice in ("none", "auto", "required"):
        return ToolMode(choice, tools)
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name")
        known = [t["function"]["name"] for t in tools]
        if name not in known:
            raise InvalidRequestError(
                f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(known)})",
                param="tool_choice",
            )
        return ToolMode("named", tools, name)
    raise InvalidRequestError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def required_tools_schema(mode: ToolMode, parallel: bool) -> dict[str, Any]:
    """A JSON array of {"name", "parameters"} calls, one of the tools each (vLLM's shape for 'required')."""
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": _parameters(t)},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in mode.tools
            ]
        },
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _response_format(fmt: Any) -> StructuredOutputsParams | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, origin="response_format")
    if fmt.type == "json_schema":
        spec = fmt.json_schema
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError(
                "response_format json_schema needs {'name': ..., 'schema': {...}}", param="response_format"
            )
        # Output always matches the schema exactly, so strict: true is honoured and strict: false is stricter.
        return StructuredOutputsParams(json=spec["schema"], origin="response_format")
    raise InvalidRequestError(
        f"response_format type {fmt.type!r} is not supported; use text, json_object or json_schema",
        param="response_format",
    )


def request_constraint(req: Any) -> StructuredOutputsParams | None:
    """The one constraint a completion or chat request sets; two at once is a 400."""
    found: list[StructuredOutputsParams] = []
    if req.structured_outputs is not None:
        found.append(StructuredOutputsParams.from_dict(req.structured_outputs, origin="structured_outputs"))
    for field_name, kind in _GUIDED:
        value = getattr(req, field_name)
        if value is not None:
            found.append(StructuredOutputsParams.from_dict({kind: value}, origin=field_name))
    fmt = _response_format(getattr(req, "response_format", None))
    if fmt is not None:
        found.append(fmt)
    if hasattr(req, "tools"):
        mode = tool_mode(req)
        if mode.kind == "required":
            found.append(StructuredOutputsParams(json=required_tools_schema(mode, req.parallel_tool_calls),
                                                 origin="tool_choice"))
        elif mode.kind == "named":
            tool = next(t for t in mode.tools if t["function"]["name"] == mode.name)
            found.append(StructuredOutputsParams(json=_parameters(tool), origin="tool_choice"))
    if len(found) > 1:
        raise InvalidRequestError(
            "only one output constraint may be set per request; got " + ", ".join(f.origin for f in found),
            param=found[1].origin,
        )
    return found[0] if found else None


def tool_message_fields(message: Any) -> dict[str, Any]:
    """tool_calls / tool_call_id of a chat message in the shape chat templates read (arguments as objects)."""
    out: dict[str, Any] = {}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str):
                fn["arguments"] = _json_or_text(args)
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _json_or_text(text: str) -> Any:
    """Arguments as an object when they are JSON; otherwise the text, which a template may still print."""
    try:
        return json.loads(text)
    except ValueError:
        return text
