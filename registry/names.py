"""Model names: `name[:tag]`, with `:latest` when no tag is given (Ollama's rule), compared case-insensitively.

A name is one to three `/`-separated components (`smollm2`, `owner/repo`, `hf.co/owner/repo`) and a tag.
Every component is restricted to letters, digits, `.`, `_` and `-` and may not start with `.`, so a name can
never reach outside the store (no `..`, no path separators, no absolute paths).
"""

from __future__ import annotations

import dataclasses
import re

from .errors import MgrError

# Matched whole (fullmatch): with re.match, `$` also matches before a final newline, and "probe\n:latest" got in.
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH = 200


class InvalidName(MgrError, ValueError):
    status = 400


@dataclasses.dataclass(frozen=True)
class ModelName:
    path: str  # "smollm2", "hf.co/owner/repo"
    tag: str  # "latest", "Q4_K_M"

    def __str__(self) -> str:
        return f"{self.path}:{self.tag}"

    @property
    def key(self) -> str:
        """What two names must share to be the same model."""
        return str(self).lower()


def parse_name(text: str) -> ModelName:
    if not isinstance(text, str) or not text.strip():
        raise InvalidName("a model name is required, as in smollm2 or smollm2:135m")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidName(f"model name is longer than {MAX_NAME_LENGTH} characters")
    path, sep, tag = text.rpartition(":")
    if not sep:
        path, tag = text, "latest"
    components = path.split("/")
    if len(components) > 3 or not all(_COMPONENT.fullmatch(c) for c in components) or not _COMPONENT.fullmatch(tag):
        raise InvalidName(
            f"invalid model name {text!r}: use name[:tag] with letters, digits, '.', '_' and '-' "
            "(at most three '/'-separated parts, none starting with '.')"
        )
    return ModelName(path, tag)
