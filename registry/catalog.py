"""The catalog of short names (catalog.toml): `family:size[-variant]` -> repos on each hub, for each format.

    qwen2.5:7b            the preferred format (`prefer`), default quantization when GGUF
    qwen2.5:7b-q4_K_M     GGUF, that quantization (matched case-insensitively against the repo's file names)
    qwen2.5:7b-gguf       GGUF, default quantization
    qwen2.5:7b-safetensors
    qwen2.5               qwen2.5:latest, the size the catalog's [latest] table names
    qwen2.5:q8_0          the latest size, that quantization

Ollama-style names with `-instruct` (qwen2.5:7b-instruct-q4_K_M) are accepted: every entry is an instruct model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from .errors import PullError
from .hubs import APIS, HUBS, Api, Source
from .refs import ShortReference

Format = Literal["gguf", "safetensors"]
FORMATS: tuple[Format, ...] = ("gguf", "safetensors")
_FORMAT_NAMES: Mapping[str, Format] = {f: f for f in FORMATS}
DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")

# Variant parts that say nothing in a catalog of instruct models.
_NOISE = {"instruct", "it", "chat"}
# What a bare tag must look like to be read as a quantization of the latest size (qwen2.5:q8_0).
_QUANT_LIKE = re.compile(r"^(ud-)?(i?q\d.*|f16|f32|bf16)$", re.IGNORECASE)


def as_format(text: str) -> Format | None:
    """The format `text` names (case-insensitively), or None."""
    return _FORMAT_NAMES.get(text.lower())


class UnknownModel(PullError, LookupError):
    status = 404


class InvalidCatalog(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    name: str  # "qwen2.5:7b"
    repos: Mapping[Format, Mapping[Api, str]]  # format -> {"hf": repo, "modelscope": repo}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One place a short name can be pulled from; tried in order until one answers."""

    source: Source
    repo: str
    format: Format | None  # None: whatever the repo holds (a hub reference names no format)
    tag: str | None  # the GGUF quantization asked for; None = the default choice


class Catalog:
    def __init__(self, entries: Mapping[str, CatalogEntry], latest: Mapping[str, str]) -> None:
        self.entries = dict(entries)
        self.latest = dict(latest)

    @classmethod
    def from_toml(cls, text: str) -> Catalog:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidCatalog(f"catalog is not valid TOML: {e}") from None
        entries: dict[str, CatalogEntry] = {}
        for name, formats in data.get("models", {}).items():
            if name != name.lower() or name.count(":") != 1:
                raise InvalidCatalog(f"catalog name {name!r} must be lower-case family:size")
            repos: dict[Format, dict[Api, str]] = {}
            for key, hubs in formats.items():
                fmt = _FORMAT_NAMES.get(key)
                if fmt is None or not isinstance(hubs, dict) or not set(hubs) <= set(APIS):
                    raise InvalidCatalog(f"{name}: expected gguf/safetensors = {{ hf = ..., modelscope = ... }}")
                repos[fmt] = {api: str(hubs[api]) for api in APIS if api in hubs}
            entries[name] = CatalogEntry(name, repos)
        latest = {str(k).lower(): str(v).lower() for k, v in data.get("latest", {}).items()}
        for family, size in latest.items():
            if f"{family}:{size}" not in entries:
                raise InvalidCatalog(f"[latest] {family} = {size!r} names no entry")
        return cls(entries, latest)

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        return cls.from_toml((path or DEFAULT_CATALOG).read_text())

    def _entry(self, ref: ShortReference) -> tuple[CatalogEntry, str | None]:
        """The entry a short name means, and its variant (a quantization or a format), if any."""
        family, tag = ref.family, ref.tag
        if tag.lower() == "latest":
            size, variant = self.latest.get(family), None
        else:
            size, _, rest = tag.partition("-")
            size = size.lower()
            parts = [p for p in rest.split("-") if p and p.lower() not in _NOISE] if rest else []
            variant = "-".join(parts) or None
            if f"{family}:{size}" not in self.entries and family in self.latest and _QUANT_LIKE.match(tag):
                size, variant = self.latest[family], tag
        entry = self.entries.get(f"{family}:{size}") if size else None
        if entry is None:
            sizes = sorted(n for n in self.entries if n.split(":")[0] == family)
            if sizes:
                why = f"the catalog has {', '.join(sizes)}"
            else:
                close = difflib.get_close_matches(family, {n.split(":")[0] for n in self.entries}, n=3)
                why = (f"did you mean {' or '.join(close)}?" if close
                       else "pull a hub repo instead: hf.co/{owner}/{repo}")
            raise UnknownModel(f'model "{ref.text}" is not in the catalog: {why}')
        return entry, variant

    def resolve(self, ref: ShortReference, *, prefer: Format, sources: Sequence[Source]) -> list[Candidate]:
        """Where to pull a short name from, in source order. `prefer` applies when the name names no format."""
        entry, variant = self._entry(ref)
        tag: str | None = None
        fmt: Format
        if variant is None:
            fmt = prefer if prefer in entry.repos else next(iter(entry.repos))
        elif (named := as_format(variant)) is not None:
            fmt = named
        else:
            fmt, tag = "gguf", variant
        if fmt not in entry.repos:
            raise UnknownModel(f'model "{ref.text}": the catalog has no {fmt} repo for {entry.name}')
        repos = entry.repos[fmt]
        result = []
        for source in sources:
            repo = repos.get(HUBS[source].api)
            if repo:
                result.append(Candidate(source, repo, fmt, tag))
        if not result:
            raise UnknownModel(f'model "{ref.text}": none of the sources {", ".join(sources)} has a repo for it')
        return result


@functools.cache
def default_catalog() -> Catalog:
    return Catalog.load()
