"""`mgr show NAME`: the text of an /api/show answer, laid out like `ollama show` (`--modelfile`, `--parameters`,
`--template`, `--system` and `--license` print that field alone: cli/main.py).

Every field is optional: a model created from uploaded files has no hub source, a safetensors model may have
no quantization, and an older daemon may not send `files` or `source`. Missing values drop their row, and a
section with no rows is left out, rather than printing "None".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .format import columns, human_size, short_id

KEY_WIDTH = 20  # Ollama's first column is 20 wide ("architecture        llama")


def human_count(count: int) -> str:
    """A parameter count as Ollama writes it when the details lack one: 8.0B, 135M, 512K."""
    for suffix, factor, digits in (("B", 1e9, 1), ("M", 1e6, 0), ("K", 1e3, 0)):
        if count >= factor:
            return f"{count / factor:.{digits}f}{suffix}"
    return str(count)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def section(title: str, rows: Sequence[Sequence[str]], first_width: int = KEY_WIDTH) -> list[str]:
    """A "  Title" line and its rows indented by four; rows without a value are dropped ([] when none is left)."""
    kept = [row for row in rows if any(row[1:])]
    return [f"  {title}", *("    " + line for line in columns(kept, first_width))] if kept else []


def model_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """architecture, parameters, quantization, context length, embedding length, format."""
    details: Mapping[str, Any] = info.get("details") or {}
    model_info: Mapping[str, Any] = info.get("model_info") or {}
    arch = _text(model_info.get("general.architecture") or details.get("family"))
    parameters = _text(details.get("parameter_size"))
    count = model_info.get("general.parameter_count")
    if not parameters and isinstance(count, int) and count > 0:
        parameters = human_count(count)
    return [
        ("architecture", arch),
        ("parameters", parameters),
        ("quantization", _text(details.get("quantization_level"))),
        ("context length", _text(model_info.get(f"{arch}.context_length")) if arch else ""),
        ("embedding length", _text(model_info.get(f"{arch}.embedding_length")) if arch else ""),
        ("format", _text(details.get("format"))),
    ]


def source_rows(source: Mapping[str, Any]) -> list[tuple[str, str]]:
    """hub, repo, revision, commit for a pulled model; "type upload" for one made by `mgr create`; where an
    imported one is (`mgr import`, `create --link`): its files were not copied."""
    if source.get("type") == "import":
        return [(key, _text(source.get(key))) for key in ("type", "from", "repo", "path") if source.get(key)]
    if source.get("type") and not source.get("hub"):
        return [("type", _text(source["type"]))]
    return [(key, _text(source.get(key))) for key in ("hub", "repo", "revision", "commit")]


def file_rows(info: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(path, size, 12-hex digest) per stored file."""
    files: Sequence[Mapping[str, Any]] = info.get("files") or []
    return [(_text(f.get("path")), human_size(f.get("size") or 0), short_id(f.get("digest"))) for f in files]


def format_files(info: Mapping[str, Any]) -> str:
    """`--files`: the file rows alone, in columns, without a heading (easy to read, easy to `cut`)."""
    return "\n".join(columns(file_rows(info)))


def parameter_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The `parameters` text's lines (`name   value`) as (name, value) rows."""
    rows = []
    for line in str(info.get("parameters") or "").splitlines():
        name, _, value = line.strip().partition(" ")
        if name:
            rows.append((name, value.strip()))
    return rows


def text_block(title: str, text: Any, lines: int = 4) -> list[str]:
    """A section of free text (system prompt, license): its first `lines` lines, indented, "..." after more."""
    kept = _text(text).strip().splitlines()
    if not kept:
        return []
    shown = [f"    {line}" for line in kept[:lines]]
    return [f"  {title}", *shown, *(["    ..."] if len(kept) > lines else [])]


def format_show(info: Mapping[str, Any]) -> str:
    """The whole `mgr show` text: Model, Capabilities, Parameters, System, License, Source and Files sections, a
    blank line apart (as `ollama show`, with mgr's source and files after)."""
    capabilities = [(_text(c), "") for c in info.get("capabilities") or []]
    blocks = [
        section("Model", model_rows(info)),
        # Capability rows have no value column, so they bypass section()'s "has a value" filter.
        ["  Capabilities", *(f"    {name}" for name, _ in capabilities)] if capabilities else [],
        section("Parameters", parameter_rows(info)),
        text_block("System", info.get("system")),
        text_block("License", info.get("license")),
        section("Source", source_rows(info.get("source") or {})),
        section("Files", file_rows(info), first_width=0),
    ]
    return "\n\n".join("\n".join(block) for block in blocks if block)
