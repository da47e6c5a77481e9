"""What a model can do, read once from what it is: its chat template, its metadata and its files. Shown in
/api/show and `mgr show`; the daemon answers a request that needs what the model lacks with Ollama's 400
(`"<model>" does not support tools`) in every API, rather than ignoring the field.

    completion  generates text (every model but an embedding-only one)
    embedding   an embedding model (pooling in its metadata, or an encoder architecture)
    tools       its chat template renders tools
    thinking    its chat template knows a reasoning block (<think>, enable_thinking, reasoning_content)
    vision      it takes images (a GGUF with an mmproj file beside it, or a vision config)
    insert      fill-in-the-middle (its tokenizer declares FIM tokens)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

Capability = Literal["completion", "embedding", "tools", "thinking", "vision", "insert"]
CAPABILITIES: tuple[Capability, ...] = ("completion", "embedding", "tools", "thinking", "vision", "insert")

_ENCODERS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "xlm-roberta", "roberta", "t5encoder",
             "modernbert", "neo-bert", "new"}
_THINKING_MARKS = ("<think>", "enable_thinking", "reasoning_content", "thinking")
FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")
VISION_KEY = "general.vision"  # set from a safetensors config's vision_config


def is_projector(path: str) -> bool:
    """A vision projector file (llama.cpp's mmproj), which comes with a model but is not the model."""
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and "mmproj" in name


def capabilities(template: str, model_info: Mapping[str, Any], files: Iterable[str]) -> list[Capability]:
    arch = str(model_info.get("general.architecture") or "")
    architectures = model_info.get("architectures") or []
    encoder = arch in _ENCODERS or f"{arch}.pooling_type" in model_info or any(
        str(a).endswith(("Model", "ForMaskedLM")) and not str(a).endswith("ForCausalLM") for a in architectures)
    if encoder:
        return ["embedding"]
    found: list[Capability] = ["completion"]
    if "tools" in template:
        found.append("tools")
    if any(mark in template for mark in _THINKING_MARKS):
        found.append("thinking")
    if model_info.get(VISION_KEY) or any(is_projector(path) for path in files):
        found.append("vision")
    if all(key in model_info for key in FIM_KEYS):
        found.append("insert")
    return found
