"""How much memory a model will take once loaded, before it is loaded.

GGUF (llama.cpp): the file (weights) + the KV cache for num_ctx tokens in each of num_parallel sequences
(f16 keys and values for every layer) + a compute buffer. Safetensors (vLLM): weights + the same KV cache +
vLLM's own overhead (CUDA graphs, activations); vLLM then fills the share it is granted with KV blocks.
These are estimates: the scheduler replaces them with what NVML reports a runner really uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIB = 1 << 20
GGUF_COMPUTE_BUFFER = 256 * MIB
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


def estimate(model_format: str, weights: int, model_info: Mapping[str, Any], num_ctx: int, num_parallel: int) -> int:
    per_sequence = kv_bytes_per_token(model_info) * num_ctx
    if model_format == "gguf":
        return weights + per_sequence * num_parallel + GGUF_COMPUTE_BUFFER
    # vLLM fills the share it is granted with KV blocks and pages them among sequences
    sequences = min(num_parallel, VLLM_KV_SEQUENCES)
    return max(VLLM_MIN_SHARE, weights + per_sequence * sequences + VLLM_OVERHEAD)
