"""The error hierarchy: each error knows its HTTP status and OpenAI error type."""

from __future__ import annotations


class PagedLLMError(Exception):
    """Base of every error pagedllm raises on purpose."""

    http_status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,  # OpenAI's shape: a string or null, never the HTTP status
            }
        }


class InvalidRequestError(PagedLLMError):
    """The request is malformed or out of range (HTTP 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context or the KV cache."""

    def __init__(self, message: str, *, param: str | None = "messages", code: str | None = None) -> None:
        super().__init__(message, param=param, code=code or "context_length_exceeded")


class ModelNotFoundError(PagedLLMError):
    http_status = 404
    error_type = "not_found_error"


class AuthenticationError(PagedLLMError):
    http_status = 401
    error_type = "authentication_error"


class QueueFullError(PagedLLMError):
    """Admission queue is full; retry later (HTTP 429)."""

    http_status = 429
    error_type = "rate_limit_error"


class ServiceUnavailableError(PagedLLMError):
    """Engine is shutting down or dead (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable"


class ConfigError(PagedLLMError, ValueError):
    """An engine configuration a user can fix, with a message saying how."""

    http_status = 400
    error_type = "invalid_request_error"


class PlatformError(PagedLLMError, RuntimeError):
    """No platform could be selected, or the selected one cannot be used."""

    error_type = "platform_error"


class PluginVersionError(PlatformError):
    """A plugin was written for another major PLUGIN_API_VERSION."""


class ModelLoadError(PagedLLMError, RuntimeError):
    """A checkpoint cannot be loaded: unknown architecture, missing tensor, bad shape."""

    error_type = "model_load_error"


class EngineDeadError(ServiceUnavailableError):
    """The engine process died; requests waiting on it fail with this."""


class UpstreamError(PagedLLMError):
    """A router's replica failed a request after it was sent there (HTTP 502)."""

    http_status = 502
    error_type = "upstream_error"
