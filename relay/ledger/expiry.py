"""When a key stops working: durations (``30d``, ``24h``, ``1h30m``) and moments (ISO 8601, UTC
unless they say otherwise), read once from the CLI or the admin API into unix seconds.

Pure functions, no I/O. Each raises :class:`ValueError` with a message meant to be shown as is
(the CLI prints it on one line, the admin API answers it as a 400), so both say the same thing.
"""

from __future__ import annotations

import datetime as dt
import math
import re

#: Seconds per unit of a duration.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhd]))", re.IGNORECASE)
#: The longest duration taken (a typo such as ``3000000d`` should not mean "never", silently).
MAX_DURATION_S = 100 * 365 * 86_400
#: The last moment a key may expire at: the last day a date-time can show, less a day.
LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC).timestamp()


def parse_duration(text: str | int | float, what: str = "a duration") -> float:
    """Seconds in ``text``: a number with a unit (``45s``, ``90m``, ``24h``, ``30d``), several
    (``1d12h``), or a plain number of seconds given as a JSON number (not as text: "30" could
    mean days). At least 0 and at most 100 years."""
    if isinstance(text, bool):
        raise ValueError(f"{what} must be like 30d, 24h, 90m or 45s, got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        compact = text.strip().replace(" ", "")
        parts = _DURATION.findall(compact)
        if not compact or "".join(n + u for n, u in parts).lower() != compact.lower():
            raise ValueError(
                f"{what} must be a number with a unit s, m, h or d (30d, 24h, 90m, 45s), "
                f"got {text!r}"
            )
        seconds = sum(float(number) * UNITS[unit.lower()] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must not be negative, got {text!r}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{what} must be at most 100 years (36500d), got {text!r}")
    return seconds


def parse_moment(text: str | int | float, what: str = "the time") -> float:
    """Unix seconds of ``text``: an ISO 8601 date (its first second, UTC), an ISO date-time
    (UTC unless it carries ``Z`` or an offset), or unix seconds given as a JSON number."""
    if isinstance(text, bool):
        raise ValueError(f"{what} must be an ISO 8601 date or date-time, got {text!r}")
    if isinstance(text, int | float):
        moment = float(text)
    else:
        stripped = text.strip()
        try:
            if len(stripped) == 10:
                day = dt.date.fromisoformat(stripped)
                parsed = dt.datetime(day.year, day.month, day.day)
            else:
                parsed = dt.datetime.fromisoformat(stripped)
        except ValueError:
            raise ValueError(
                f"{what} must be an ISO 8601 date or date-time (2027-01-31, "
                f"2027-01-31T12:00:00Z; UTC unless it says), got {text!r}"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        try:
            moment = parsed.timestamp()
        except (OverflowError, ValueError):
            moment = math.inf
    if not math.isfinite(moment) or not 0 <= moment <= LATEST:
        raise ValueError(f"{what} must lie between 1970-01-01 and 9999-12-30, got {text!r}")
    return moment


def expiry(
    *, expires_in: str | int | float | None, expires_at: str | int | float | None, now: float
) -> float | None:
    """The moment a key expires, from at most one of ``expires_in`` (a duration from ``now``)
    and ``expires_at`` (a moment); None when neither is given (the key never expires).
    A moment that is not after ``now`` is refused: a key that is dead on arrival is a typo."""
    if expires_in is not None and expires_at is not None:
        raise ValueError("give either expires-in or expires-at, not both")
    if expires_in is not None:
        seconds = parse_duration(expires_in, "expires-in")
        if seconds <= 0:
            raise ValueError(f"expires-in must be more than 0s, got {expires_in!r}")
        return now + seconds
    if expires_at is not None:
        moment = parse_moment(expires_at, "expires-at")
        if moment <= now:
            raise ValueError(
                f"expires-at {format_moment(moment)} is in the past (it is now "
                f"{format_moment(now)}); to stop a key at once, revoke it"
            )
        return moment
    return None


def format_moment(ts: float) -> str:
    """``2027-01-31T12:00:00Z``: UTC, to the second, as the API and the messages show times."""
    moment = dt.datetime.fromtimestamp(math.floor(ts), dt.UTC)
    return moment.isoformat().replace("+00:00", "Z")

