"""One error hierarchy for everything a client can be told.

Every failure that reaches a client is a :class:`RelayError`: it carries the HTTP status and
OpenAI's error ``type`` / ``code`` / ``param``, so the HTTP layer renders every error the same way
(``{"error": {"message", "type", "param", "code"}}``) and no traceback ever reaches a client.
The subclasses name what the *client* can do about the failure, as httpx's hierarchy does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType


class RelayError(Exception):
    """A failure with the HTTP status and OpenAI error fields a client should see."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


class InvalidRequest(RelayError):
    """400: the request body or its fields are wrong; the message names the field."""

    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(RelayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientQuota(RelayError):
    """402: the key's credits do not cover the request's estimated cost; nothing was sent
    upstream. (OpenAI itself uses 429 for this; relays and DeepSeek use 402, which the OpenAI
    SDKs raise as a plain ``APIStatusError`` that is not retried.)"""

    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDenied(RelayError):
    status = 403
    type = "permission_error"


class NotFound(RelayError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(RelayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(RelayError):
    """408: the client did not send its whole request body in time."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(RelayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(RelayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(RelayError):
    """429 from the relay's own guards: the key's queue is full, its wait ran out, or a key
    that may not queue is at one of its limits. The code and the message say which limit
    refused (``queue_full``, ``queue_timeout``, ``rate_limit_exceeded`` for a TPM/RPM bucket,
    ``concurrency_limit_exceeded`` for a max_concurrency: a cap on requests at once is not a
    rate); the type stays OpenAI's ``rate_limit_error`` for every 429.

    ``Retry-After`` and ``retry-after-ms`` say when to come back; the OpenAI SDKs honour them.
    """

    status = 429
    type = "rate_limit_error"
    def __init__(self, refused) -> None:  # a guards.admission.AdmissionRefused
        retry_after = max(1.0, float(refused.retry_after_s))
        super().__init__(
            # The phrase the Codex CLI parses for its retry delay (protocols.md §2.6).
            f"{refused.message} Please try again in {int(retry_after)}s.",
            code=refused.code,
            headers={
                "retry-after": str(int(retry_after)),
                "retry-after-ms": str(int(retry_after * 1000)),
            },
        )
        self.retry_after_s = retry_after


class UpstreamError(RelayError):
    """The upstream answered with an error status before any byte reached the client.

    ``upstream_status`` is what the upstream answered (``status`` is what the client is told:
    Anthropic's 529 becomes 503, for example); ``retry_after_s`` is the rest it asked for,
    bounded by ``server.max_retry_after_s``, ``upstream_rest_s`` the same unbounded (a ChatGPT
    plan's usage window resets in hours: relay/upstream/health.py).
    """

    status = 502
    type = "upstream_error"
    upstream_status: int = 502
    retry_after_s: float | None = None
    upstream_rest_s: float | None = None
    #: The answer's ``x-codex-*`` headers (a ChatGPT plan's usage windows), if any.
    usage_headers: Mapping[str, str] = MappingProxyType({})


class UpstreamUnavailable(RelayError):
    """502: no connection to the upstream could be made, or it broke before answering."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamResponseTooLarge(RelayError):
    """502: the upstream's answer is beyond the relay's bounds (a non-streamed body over
    ``server.upstream_max_body_bytes`` decoded, or a stream event over
    ``server.upstream_max_event_bytes``): it is not relayed, and the relay's memory stays
    bounded whatever an upstream sends."""

    status = 502
    type = "upstream_error"
    code = "upstream_response_too_large"


class NoHealthyAccount(RelayError):
    """503: every account that could serve the request is out of service."""

    status = 503
    type = "service_unavailable_error"
    code = "no_healthy_account"


class ShuttingDown(RelayError):
    """503: the relay is shutting down (SIGTERM); the request was not (or no longer) served.
    ``Retry-After`` tells the client to come back, to another instance or this one restarted."""

    status = 503
    type = "service_unavailable_error"
    code = "relay_shutdown"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})


class SharedStateUnavailable(RelayError):
    """503: the Redis holding the limits shared by several relay processes cannot be reached
    and ``server.redis_failure = "closed"``: the request was not served."""

    status = 503
    type = "service_unavailable_error"
    code = "shared_state_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": "1"})


class LedgerUnavailable(RelayError):
    """503: the ledger's database cannot be reached right now and the request needs it (a key
    this relay has not seen yet); keys it knows keep working, their usage waits in memory."""

    status = 503
    type = "service_unavailable_error"
    code = "ledger_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": "1"})


class RelayBusy(RelayError):
    """503: the relay itself is at a limit of its own (all its upstream connections in use);
    no account is at fault, so none is marked unhealthy and the request is not failed over."""

    status = 503
    type = "service_unavailable_error"
    code = "relay_busy"


class UpstreamTimeout(RelayError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class InternalError(RelayError):
    """500 with OpenAI's generic message; the traceback stays in the relay's log."""

    status = 500
    type = "server_error"

    def __init__(self, request_id: str = "") -> None:
        suffix = f" Quote request id {request_id} when reporting it." if request_id else ""
        super().__init__("The relay had an internal error while processing your request." + suffix)
