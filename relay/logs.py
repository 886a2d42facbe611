"""What the relay tells its operator: one access-log line per request, and operator events.

Both go through :mod:`logging` to the process's standard error, in one of two formats
(``server.log_format``): ``text``, one human-readable line per record (an access line is
``key=value`` pairs; a value holding a space, a quote, ``=`` or a control character is written as
a JSON string, so a client's path can neither break the line nor forge a field), or ``json``, one
JSON object per line (JSON Lines), every field its own member. In a worker of several
(``relay serve --workers N``), every line names it: ``relay.access [worker 2]: …`` in text,
``"worker": 2`` in JSON.

* **The access log** (logger ``relay.access``): one line when each HTTP request ends, whatever
  its route and outcome: time, request id, key id, method, path, the model asked and the model
  served, the account, status, error code, tokens in and out, credits charged, queue wait, time
  to first byte and duration. ``server.access_log = false`` turns it off. It does not follow
  ``--log-level`` (that is for the relay's own messages): an operator who quiets warnings keeps
  the record of who called what.
* **Operator events** (logger ``relay.events``): something the operator may have to act on,
  logged once when it happens, with its reason: an account taken out of service and put back,
  an account whose credentials variable is unset (at start, naming the variable), an account's
  cool-down, the usage writer falling behind and catching up. Redis lost and back
  (``server.redis_url``) is logged by the shared guards on the relay's own logger
  (``relay/guards/shared.py``), one line each way.

No line carries a key or an upstream secret: an access line names the key by its id
(``key_…``), the path is logged without its query string (where Gemini-style clients put keys),
and an event's reason has the account's own credential removed (:func:`redact`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from .config_checks import unset_key_variables

if TYPE_CHECKING:
    from .config import Config

ACCESS = logging.getLogger("relay.access")
EVENTS = logging.getLogger("relay.events")

#: The order of an access line's fields (text and JSON).
ACCESS_FIELDS = (
    "request_id", "key_id", "method", "path", "model", "served_model", "account", "status",
    "error", "tokens_in", "tokens_out", "credits", "queue_ms", "ttfb_ms", "duration_ms",
)

LOG_FORMATS = ("text", "json")


def utc_timestamp(seconds: float) -> str:
    """``2026-12-07T13:20:01.123Z``: ISO 8601, UTC, milliseconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + (
        f".{int((seconds - whole) * 1000):03d}Z"
    )


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message>``, one line: a message's line breaks are
    escaped, so nothing a client sends can forge a line. In worker ``N`` of several
    (``relay serve --workers``), the logger is followed by ``[worker N]``."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = f" [worker {worker}]" if worker is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = (
            f"{utc_timestamp(record.created)} {record.levelname} {record.name}{self.worker}: "
            f"{message}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, and the
    record's fields (an access line's, an event's ``event`` and ``account``…); ``worker``: the
    worker's number, in worker ``N`` of several."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(
    level: str = "INFO", log_format: str = "text", access_log: bool = True,
    worker: int | None = None,
) -> None:
    """Send every log record to standard error in ``log_format``; the relay's messages at
    ``level`` and above, the access log at INFO unless ``access_log`` is false. ``worker``:
    this process is that worker of several, and every line says so."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    handler.setFormatter(formatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    ACCESS.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    # httpx2 logs every upstream request at INFO: noise, and work on the hot path.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def access_text(fields: dict[str, Any]) -> str:
    """An access line's fields as ``key=value`` pairs (``-`` for a value not known)."""
    return " ".join(f"{name}={_text_value(fields.get(name))}" for name in ACCESS_FIELDS)


def _text_value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if any(c in text for c in " \"'\\=") or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)  # quoted and escaped, one line
    return text


def log_access(fields: dict[str, Any]) -> None:
    """Write one access line (a no-op, costing one level check, when the log is off)."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("%s", access_text(fields), extra={"fields": {"type": "access", **fields}})


def event(name: str, message: str, *args: Any, level: int = logging.WARNING, **fields: Any) -> None:
    """Log the operator event ``name`` (its fields go to the JSON form as they are)."""
    EVENTS.log(level, message, *args, extra={"fields": {"event": name, **fields}})


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every occurrence of each secret (of 4 characters or more) replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


def log_missing_credentials(config: Config) -> None:
    """At start: one event per account whose credentials variable is unset or empty."""
    for index, env, state in unset_key_variables(config):
        name = config.accounts[index].name
        event(
            "account_missing_credentials",
            "account %s has no credentials: environment variable %s %s; the upstream will "
            "refuse its requests until the relay runs with it set",
            name, env, state,
            account=name, variable=env,
        )
