"""How much memory a model will take once loaded, before it is loaded.

GGUF (llama.cpp): the file (weights) + the KV cache for num_ctx tokens in each of num_parallel sequences
(f16 keys and values for every layer) + a compute buffer, + on a GPU the runner's CUDA context and cuBLAS
workspace there (one per GPU it uses). Safetensors (vLLM): weights + the same KV cache +
vLLM's own overhead (CUDA graphs, activations); vLLM then fills the share it is granted with KV blocks.
These are estimates: the scheduler replaces them with what NVML reports a runner really uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIB = 1 << 20
GIB = 1 << 30
GGUF_COMPUTE_BUFFER = 256 * MIB
# A llama.cpp runner's CUDA context and cuBLAS workspace, on each GPU it uses whatever its layers (NVML: 1,504 MiB
# for SmolLM2 fully offloaded on an H200, where weights, KV cache and compute buffer come to ~1,070). Left out, a
# fresh daemon placed SmolLM2 whole in 1,173 MiB free and its KV cache failed to allocate (H200, 2026-12-01).
GGUF_GPU_CONTEXT = 512 * MIB
# What a runner holds on each GPU whatever its layers; partial offload counts it before layers (a share of the free
# memory by layers alone ran out on the H200).
GGUF_GPU_FIXED = GGUF_GPU_CONTEXT + GGUF_COMPUTE_BUFFER
VLLM_OVERHEAD = 2048 * MIB  # CUDA context, graphs and activations (1.2 GiB measured for a 135M model asleep)
VLLM_KV_SEQUENCES = 32  # vLLM pages its KV cache: room for this many full contexts is plenty to batch well
# vLLM refuses to start when its share leaves no room for KV blocks after weights, activations and CUDA
# graphs; below this a share is too tight to be worth the risk.
VLLM_MIN_SHARE = 6 << 30


def kv_bytes_per_token(model_info: Mapping[str, Any]) -> int:
    """f16 K and V for every layer; 0 when the metadata does not say."""
    arch = model_info.get("general.architecture")
    layers = model_info.get(f"{arch}.block_count")
    heads = model_info.get(f"{arch}.attention.head_count")
    kv_heads = model_info.get(f"{arch}.attention.head_count_kv") or heads
    head_dim = model_info.get(f"{arch}.attention.key_length")
    if not head_dim and heads and model_info.get(f"{arch}.embedding_length"):
        head_dim = int(model_info[f"{arch}.embedding_length"]) // int(heads)
    if not (layers and kv_heads and head_dim):
        return 0
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * 2


def estimate(model_format: str, weights: int, model_info: Mapping[str, Any], num_ctx: int, num_parallel: int,
             on_gpu: bool = True) -> int:
    """Bytes the model takes loaded; a GGUF model on one GPU when `on_gpu` (else in RAM: no CUDA context)."""
    per_sequence = kv_bytes_per_token(model_info) * num_ctx
    if model_format == "gguf":
        return weights + per_sequence * num_parallel + GGUF_COMPUTE_BUFFER + (GGUF_GPU_CONTEXT if on_gpu else 0)
    # vLLM fills the share it is granted with KV blocks and pages them among sequences
    sequences = min(num_parallel, VLLM_KV_SEQUENCES)
    return max(VLLM_MIN_SHARE, weights + per_sequence * sequences + VLLM_OVERHEAD)


# Ollama's default context by the machine's total GPU memory (its server/routes.go, with the same slightly lower
# thresholds): 256k tokens from 47 GiB, 32k from 23 GiB, else (and on the CPU) 4k.
CONTEXT_TIERS = ((47 * GIB, 262_144), (23 * GIB, 32_768), (0, 4_096))
MIN_DEFAULT_CONTEXT = 2_048


def default_context(gpu_memory: int, trained: int | None, model_format: str, weights: int,
                    model_info: Mapping[str, Any], num_parallel: int) -> int:
    """The context a model gets when nobody set one: the tier of the GPUs' total memory, no more than the model
    was trained for, and halved (not below 2k) while the model with num_parallel contexts of KV cache would not
    fit that memory, as Ollama lowers an automatic context that does not fit. Total, not free, memory: the
    answer stays the same while models come and go, so a loaded model is never reloaded for it."""
    context = next(tokens for floor, tokens in CONTEXT_TIERS if gpu_memory >= floor)
    if trained:
        context = min(context, trained)
    if gpu_memory:
        while context > MIN_DEFAULT_CONTEXT and \
                estimate(model_format, weights, model_info, context, num_parallel) > gpu_memory:
            context //= 2
    return context
