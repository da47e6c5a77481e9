"""Text formatting for the CLI: tables, sizes, relative times, the `ps` columns and `--verbose` stats.

The wording follows `ollama` (its `format` package) so that users and scripts used to Ollama read the same
thing: decimal size units, "About a minute ago", "4 minutes from now", "Forever".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

COLUMN_GAP = "   "

_UNITS = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000))


def human_size(size: int | float) -> str:
    """98 MB, 1.2 GB, 15 GB, 512 B (decimal units, one decimal only below 10 and when not whole)."""
    size = int(size)
    for unit, factor in _UNITS:  # noqa: B007  (`unit` is used after the loop)
        if abs(size) >= factor:
            value = size / factor
            break
    else:
        return f"{size} B"
    if abs(value) >= 10 or value == math.trunc(value):
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """The length of a (non-negative) span: "Less than a second", "About a minute", "3 days"."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = int(seconds // 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def relative_time(when: datetime, now: datetime | None = None) -> str:
    """The distance from now: "2 minutes ago" for the past, "4 minutes from now" for the future."""
    now = now or datetime.now(UTC)
    delta = (now - when).total_seconds()
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime; None for null, empty or unreadable values.

    Go and the daemon may send nanoseconds; datetime keeps microseconds, so extra digits are cut first.
    """
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", value.strip()))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def short_id(digest: str | None) -> str:
    """The first 12 hex digits of a digest, with or without its "sha256:" prefix."""
    digest = digest or ""
    return digest.split(":", 1)[-1][:12]


def columns(rows: Sequence[Sequence[str]], first_width: int = 0) -> list[str]:
    """Rows padded into columns three spaces apart (the first at least `first_width` wide), no trailing blanks."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) + len(COLUMN_GAP) for i in range(len(rows[0]))]
    widths[0] = max(widths[0], first_width)
    return ["".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns padded to the widest cell, three spaces apart, without trailing blanks."""
    return "\n".join(columns([list(headers), *rows]))


# -- `mgr list` and `mgr ps` rows --------------------------------------------------------------------------


def list_row(model: Mapping[str, Any], now: datetime | None = None) -> list[str]:
    """NAME, ID, SIZE, MODIFIED for one entry of /api/tags."""
    modified = parse_time(model.get("modified_at"))
    return [
        str(model.get("name") or model.get("model") or "?"),
        short_id(model.get("digest")),
        human_size(model.get("size") or 0),
        relative_time(modified, now) if modified else "",
    ]


def ps_name(model: Mapping[str, Any]) -> str:
    """The name, followed by the state when the model is not ready: "smollm2:latest (loading)"."""
    name = str(model.get("name") or model.get("model") or "?")
    state = model.get("state") or "ready"
    return name if state == "ready" else f"{name} ({state})"


def ps_processor(model: Mapping[str, Any]) -> str:
    """Where the model runs: "CPU" without GPUs, "GPU 0" on one, "GPU 0,1" over several."""
    gpus = list(model.get("gpus") or [])
    ray = model.get("ray")
    if isinstance(ray, dict):
        count = int(ray.get("pipeline_parallel") or 1) * int(ray.get("tensor_parallel") or 1)
        return f"Ray: {count} GPU on {len(ray.get('nodes') or [])} nodes"
    if not gpus:
        return "CPU"
    return "GPU " + ",".join(str(g) for g in gpus)


def ps_until(model: Mapping[str, Any], now: datetime | None = None) -> str:
    """When the model will be unloaded: "Stopping...", "Forever" (expires_at null) or "4 minutes from now"."""
    if model.get("state") == "unloading":
        return "Stopping..."
    expires = parse_time(model.get("expires_at"))
    # keep_alive -1 shows as a date centuries away (as Ollama's, whose clients type it as a date)
    if expires is None or expires.year - (now or datetime.now(UTC)).year > 20:
        return "Forever"
    return relative_time(expires, now)


def ps_busy(model: Mapping[str, Any]) -> str:
    """Requests being answered / slots ("1/4"), and "+N" more waiting in the model's queue ("4/4+3")."""
    queued = int(model.get("queued") or 0)
    return f"{model.get('active', 0)}/{model.get('num_parallel', '?')}" + (f"+{queued}" if queued else "")


def ps_row(model: Mapping[str, Any], now: datetime | None = None) -> list[str]:
    """NAME, ID, SIZE, PROCESSOR, CONTEXT, BACKEND, BUSY, UNTIL for one /api/ps entry: Ollama's columns
    (CONTEXT: tokens per request) plus the engine and the slots in use, in 100 columns for a usual name."""
    return [
        ps_name(model),
        short_id(model.get("digest")),
        human_size(model.get("size") or 0),
        ps_processor(model),
        str(model.get("context_length") or ""),
        str(model.get("backend") or ""),
        ps_busy(model),
        ps_until(model, now),
    ]


LIST_HEADERS = ("NAME", "ID", "SIZE", "MODIFIED")
PS_HEADERS = ("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "BACKEND", "BUSY", "UNTIL")


# -- `--verbose` statistics --------------------------------------------------------------------------------


def go_duration(ns: int) -> str:
    """Nanoseconds written like Go's time.Duration (what `ollama run --verbose` shows): 1.234s, 12.5ms, 2m3.1s."""
    ns = int(ns)
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return sign + _decimal(ns, 1_000, 3) + "µs"
    if ns < 1_000_000_000:
        return sign + _decimal(ns, 1_000_000, 6) + "ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = sign + (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return text + _decimal(rest, 1_000_000_000, 9) + "s"


def _decimal(value: int, unit: int, digits: int) -> str:
    whole, fraction = divmod(value, unit)
    decimals = f"{fraction:0{digits}d}".rstrip("0")
    return f"{whole}.{decimals}" if decimals else str(whole)


def stats(final: Mapping[str, Any]) -> str:
    """The timing summary of a final (`done: true`) chunk, line for line as `ollama run --verbose` prints it."""

    def number(key: str) -> int:
        try:
            return int(final.get(key) or 0)
        except (TypeError, ValueError):
            return 0

    rows: list[tuple[str, str]] = []
    if number("total_duration") > 0:
        rows.append(("total duration", go_duration(number("total_duration"))))
    if number("load_duration") > 0:
        rows.append(("load duration", go_duration(number("load_duration"))))
    for label in ("prompt eval", "eval"):
        key = label.replace(" ", "_")
        count, duration = number(f"{key}_count"), number(f"{key}_duration")
        if count > 0:
            rows.append((f"{label} count", f"{count} token(s)"))
        if duration > 0:
            rows.append((f"{label} duration", go_duration(duration)))
            rows.append((f"{label} rate", f"{count / (duration / 1e9):.2f} tokens/s"))
    # Ollama aligns the values at column 22 ("prompt eval duration: " is the longest label).
    return "\n".join(f"{label + ':':<22}{value}" for label, value in rows)
