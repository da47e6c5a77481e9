"""A model's LoRA adapter (a Modelfile's ADAPTER: a GGUF made by llama.cpp's convert_lora_to_gguf.py) on the
engine's context, at full scale: every sequence's answers go through it, as with llama-server's --lora."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp as llama


def apply_lora(model: Any, ctx: Any, path: str) -> None:
    """Load the adapter for `model` and set it on `ctx`; RuntimeError when llama.cpp refuses it (another
    architecture, tensors of the wrong shape: llama.cpp logs why)."""
    adapter = llama.llama_adapter_lora_init(model, path.encode())
    if not adapter:
        raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path} (see the lines above)")
    adapters = (llama.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(1.0)
    if llama.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
        raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {path} to its context")
