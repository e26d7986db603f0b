"""StructuredOutputsParams: the one constraint a request's output must satisfy (vLLM's record of that name)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedllm.errors import InvalidRequestError

BACKENDS = ("xgrammar", "llguidance")


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON schema, as a dict or its text), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (EBNF / GBNF) is set."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Where the constraint came from, for error messages ("response_format", "tool_choice", ...).
    origin: str = "structured_outputs"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, data: Any, origin: str = "structured_outputs") -> StructuredOutputsParams:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise InvalidRequestError(f"{origin} must be an object, got {type(data).__name__}", param=origin)
        known = {"json", "regex", "choice", "grammar", "json_object"}
        unknown = sorted(set(data) - known - {"backend", "disable_fallback", "whitespace_pattern"})
        if unknown:
            raise InvalidRequestError(
                f"{origin} has unknown key(s) {', '.join(unknown)}; expected one of {', '.join(sorted(known))}",
                param=origin,
            )
        return cls(**{k: v for k, v in data.items() if k in known and v is not None}, origin=origin)

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar", "json_object"):
            if getattr(self, name) not in (None, False):
                return name
        raise AssertionError("validated params have a kind")

    def validate(self) -> None:
        set_ = [n for n in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, n) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(
                f"{self.origin} needs exactly one of json, regex, choice, grammar or json_object; got "
                + (", ".join(set_) if set_ else "none"),
                param=self.origin,
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as exc:
                    raise InvalidRequestError(f"{self.origin}: the JSON schema is not valid JSON: {exc}",
                                              param=self.origin) from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(f"{self.origin}: a JSON schema must be an object", param=self.origin)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"{self.origin}: {name} must be a non-empty string", param=self.origin)
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise InvalidRequestError(f"{self.origin}: choice must be a non-empty list of strings", param=self.origin)

    def schema_text(self) -> str:
        """The JSON schema as compact text (cache key and what the libraries take); key order is
        kept, since it is the order the output's properties take."""
        schema = json.loads(self.json) if isinstance(self.json, str) else self.json
        return json.dumps(schema, separators=(",", ":"))

    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: equal keys share one compilation."""
        kind = self.kind
        if kind == "json":
            return kind, self.schema_text()
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)
