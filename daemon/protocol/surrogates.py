"""Lone UTF-16 surrogates in parsed JSON: text that is not Unicode, refused where request bodies are read.

JSON lets a string carry "\\ud83d" (half of an emoji's surrogate pair) on its own, and Python's json module
decodes it into a str that cannot be encoded as UTF-8; so does raw CESU-8 in the body (json decodes bytes with
"surrogatepass"). Such a string reaching a tokenizer raised UnicodeEncodeError deep in the llama.cpp runner's
engine thread. A valid pair is combined into one code point by the parser, so only lone halves remain.

Used by the daemon's body parsing and by the llama.cpp runner (an HTTP server of its own): stdlib only.
"""

from __future__ import annotations

import re
from typing import Any

# What a lone surrogate can come from: a \uD800-\uDFFF escape, or the CESU-8 bytes ED A0-BF xx. Bodies without
# either (nearly all) are not walked.
_POSSIBLE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def lone_surrogate(raw: bytes, parsed: Any) -> str | None:
    """Where `parsed` (the JSON of `raw`) holds a string with a lone surrogate: a path such as
    "messages[0].content", or None when every string is valid Unicode."""
    if _POSSIBLE.search(raw) is None:
        return None
    stack: list[tuple[str, Any]] = [("", parsed)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _has_surrogate(key):
                    return f"a key of {path or 'the body'}"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def message(where: str) -> str:
    return (f"{where} holds a lone UTF-16 surrogate (such as \\ud83d, half of an emoji's pair): "
            "it is not valid Unicode text; send whole characters")


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
