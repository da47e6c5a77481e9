"""Request bodies as strict JSON: what RFC 8259 allows, and no deeper than MAX_DEPTH.

Python's json module takes NaN, Infinity and -Infinity, and turns a number too large for a double (1e400) into
inf: none of them is JSON, and each broke something further on (a NaN keep_alive, an infinite temperature).
A body nested 100,000 deep made it raise RecursionError; MAX_DEPTH is far deeper than any API's bodies go
(an OpenAI tool's JSON schema is the deepest, a dozen levels) and is checked with a loop, not recursion.

Stdlib only: the daemon's body parsing uses it, and the runners may.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

MAX_DEPTH = 128
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


class NotStrictJSON(ValueError):
    """The body is not JSON as RFC 8259 has it, or nests deeper than MAX_DEPTH: the message says which."""


def _refuse_constant(name: str) -> Any:
    raise NotStrictJSON(f"{name} is not a JSON number: send finite numbers only")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotStrictJSON(f"the number {text[:40]} is too large for a 64-bit float")
    return value


def loads(raw: bytes | str) -> Any:
    """The JSON value of `raw`; NotStrictJSON for a non-standard number or nesting past MAX_DEPTH, ValueError
    (json's JSONDecodeError, with its position) for text that is not JSON at all."""
    if _openers(raw) > MAX_DEPTH:  # a body with fewer brackets than that cannot nest deeper
        _check_depth(raw)
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:  # not reached after _check_depth; kept should the two ever disagree
        raise NotStrictJSON(f"the JSON nests deeper than {MAX_DEPTH} levels") from None


def _openers(raw: bytes | str) -> int:
    if isinstance(raw, bytes):
        return raw.count(b"[") + raw.count(b"{")
    return raw.count("[") + raw.count("{")


def _check_depth(raw: bytes | str) -> None:
    """Refuse nesting past MAX_DEPTH, read from the text before the parser recurses into it: strings taken out
    (brackets in them do not count), then the depth over what brackets are left, all without recursion."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", text))
    depths = itertools.accumulate(1 if char in "[{" else -1 for char in brackets)
    if max(depths, default=0) > MAX_DEPTH:
        raise NotStrictJSON(f"the JSON nests deeper than {MAX_DEPTH} levels")
