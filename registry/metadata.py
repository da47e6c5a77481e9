"""Read what a model is from its files: format, architecture, size, quantization, context length, template.

GGUF files carry all of it in their header; safetensors folders in config.json plus each file's JSON header.
The result feeds the manifest's `details` (Ollama's /api/tags and /api/show fields) and the scheduler's memory
estimate. A file that is not what it claims raises InvalidModel, so nothing broken enters the store.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .capabilities import FIM_KEYS, VISION_KEY
from .errors import MgrError
from .gguf_header import GGUFError, read_header


class InvalidModel(MgrError, ValueError):
    status = 400


def _size_label(parameters: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            value = parameters / scale
            return f"{value:.1f}{suffix}" if value < 10 and value != int(value) else f"{value:.0f}{suffix}"
    return str(parameters)


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """A metadata value as the manifest and /api/show can carry it (JSON without NaN or infinities): a string,
    a whole number, a finite float, a bool, or a list of those; anything else is None (left out)."""
    if isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, list):
        items = [_plain(item) for item in value]
        return items if all(item is not None for item in items) else None
    return None


def inspect_gguf(path: Path, name: str | None = None) -> dict[str, Any]:
    """Details and model_info of a GGUF file (called `name` in messages: the model's file name, where `path` is
    a blob); InvalidModel when it is not a readable GGUF. A key of the wrong type (a context length that is a
    string, a name that is a number) reads as absent."""
    try:
        header = read_header(path)
    except GGUFError as e:
        raise InvalidModel(f"{name or path.name}: {e}") from None
    field = header.metadata.get
    arch = _text(field("general.architecture")) or "unknown"
    parameters = header.parameter_count
    file_type = _whole(field("general.file_type"))
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": _text(field("general.name")),
        "general.parameter_count": parameters,
        "general.file_type": file_type,
    }
    for suffix in (
        "context_length", "block_count", "embedding_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "pooling_type",
    ):
        value = _whole(field(f"{arch}.{suffix}"))
        if value is not None:
            model_info[f"{arch}.{suffix}"] = value
    for key in FIM_KEYS:  # fill-in-the-middle tokens: the `insert` capability
        if _whole(field(key)) is not None:
            model_info[key] = field(key)
    return {
        "details": {
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": _text(field("general.size_label")) or _size_label(parameters),
            "quantization_level": _file_type_name(file_type),
        },
        "model_info": model_info,
        "template": _text(field("tokenizer.chat_template")) or "",
    }


def _file_type_name(file_type: int | None) -> str:
    if file_type is None:
        return ""
    import gguf  # its enum names llama.cpp's file types; numpy comes along, which only the daemon pays

    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {file_type}"


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InvalidModel(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise InvalidModel(f"{path.name} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise InvalidModel(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidModel(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    return header


def inspect_safetensors(files: Mapping[str, Path]) -> dict[str, Any]:
    """Details of a safetensors model given {relative path: file on disk}; InvalidModel when a file is not what
    its name says (a config.json that is no JSON object, a header whose shapes are not numbers, JSON nested past
    what the parser recurses into)."""
    try:
        return _inspect_safetensors(files)
    except InvalidModel:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, OverflowError) as e:
        raise InvalidModel(f"the safetensors model's files cannot be read: {type(e).__name__}: {str(e)[:200]}") \
            from None


def _inspect_safetensors(files: Mapping[str, Path]) -> dict[str, Any]:
    if "config.json" not in files:
        raise InvalidModel("a safetensors model needs a config.json")
    weights = [name for name in files if name.endswith(".safetensors")]
    if not weights:
        raise InvalidModel("a safetensors model needs at least one *.safetensors file")
    try:
        config = json.loads(files["config.json"].read_text())
    except ValueError:
        raise InvalidModel("config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise InvalidModel("config.json must hold a JSON object")
    parameters = 0
    dtypes: set[str] = set()
    for name in weights:
        for tensor, info in _safetensors_header(files[name]).items():
            if tensor == "__metadata__":
                continue
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            parameters += count
            dtypes.add(str(info.get("dtype", "")))
    nested = config.get("text_config")
    text_config: dict[str, Any] = nested if isinstance(nested, dict) else config
    arch = str(config.get("model_type") or "unknown")
    template = ""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if name in files:
            text = files[name].read_text(errors="replace")
            template = text if name.endswith(".jinja") else str(json.loads(text).get("chat_template") or "")
            if template:
                break
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": parameters,
        "architectures": _plain(config.get("architectures")),
    }
    if isinstance(config.get("vision_config"), dict):
        model_info[VISION_KEY] = True  # the `vision` capability
    for key, ours in (
        ("max_position_embeddings", "context_length"), ("num_hidden_layers", "block_count"),
        ("hidden_size", "embedding_length"), ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length"),
    ):
        if _whole(text_config.get(key)) is not None:
            model_info[f"{arch}.{ours}"] = text_config[key]
    return {
        "details": {
            "format": "safetensors",
            "family": arch,
            "families": [arch],
            "parameter_size": _size_label(parameters),
            "quantization_level": "/".join(sorted(d for d in dtypes if d)) or str(config.get("torch_dtype", "")),
        },
        "model_info": model_info,
        "template": template,
    }
