"""A tiny vision projector (mmproj) GGUF for proving the image path of the llama.cpp runner: a real CLIP vision
encoder and a LLaVA-1.5 style "mlp" projector in the exact format llama.cpp's tools/mtmd/clip.cpp loads, with
tiny dimensions and seeded random weights. No real vision GGUF can be fetched here, so this one stands in: it
loads, encodes an image into `(image_size / patch_size)**2` embeddings of the text model's width and those
decode through the text model, but what the text model then says about the picture is nonsense.

Keys and tensor names follow clip-impl.h of the llama.cpp vendored in llama-cpp-python 0.3.36 (KEY_* and TN_*);
shapes are written in PyTorch order (out, in), which GGUF stores reversed as ggml's ne = (in, out).

The graph that runs it is clip_graph_llava (models/llava.cpp): conv2d patch embedding, class embedding,
position embedding, pre-layernorm, `block_count - 1` pre-norm transformer blocks (the LLaVA default takes the
penultimate layer, so the last block is loaded and never run), post-layernorm, then mm.0 -> GELU -> mm.2.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

IMAGE_SIZE = 64
PATCH_SIZE = 16
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # what one image becomes in the text model: 16 embeddings
HIDDEN = 64
N_HEAD = 4
# N_FF must differ from HIDDEN: clip.cpp takes an "mlp" model whose ffn_down has HIDDEN inputs for a legacy export
# with ffn_up and ffn_down swapped, and swaps them back
N_FF = 128
N_BLOCK = 2
SEED = 1234

# CLIP's normalisation, as LLaVA 1.5's mmproj carries it
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def write_tiny_mmproj(path: Path, n_embd: int = 576) -> Path:
    """Write the projector to `path` and return it. `n_embd` is the text model's embedding width (SmolLM2-135M:
    576); mtmd_init_from_file refuses a projector whose output width differs from the text model's."""
    rng = np.random.default_rng(SEED)
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2

    def linear(n_out: int, n_in: int) -> np.ndarray:
        # scaled so that activations stay near unit size through the tiny network (no NaN, no overflow in F16)
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float16)

    def vector(n: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(n) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tensors: dict[str, np.ndarray] = {
        # conv2d kernel, PyTorch (out_channels, in_channels, kh, kw); CLIP's patch embedding has no bias
        "v.patch_embd.weight": (rng.standard_normal((HIDDEN, 3, PATCH_SIZE, PATCH_SIZE))
                                / np.sqrt(3 * PATCH_SIZE * PATCH_SIZE)).astype(np.float16),
        "v.class_embd": vector(HIDDEN),
        "v.position_embd.weight": (rng.standard_normal((n_patches + 1, HIDDEN)) * 0.02).astype(np.float16),
        "v.pre_ln.weight": ones(HIDDEN),
        "v.pre_ln.bias": vector(HIDDEN),
    }
    for i in range(N_BLOCK):
        block = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{block}.{name}.weight"] = linear(HIDDEN, HIDDEN)
            tensors[f"{block}.{name}.bias"] = vector(HIDDEN)
        for name in ("ln1", "ln2"):
            tensors[f"{block}.{name}.weight"] = ones(HIDDEN)
            tensors[f"{block}.{name}.bias"] = vector(HIDDEN)
        tensors[f"{block}.ffn_up.weight"] = linear(N_FF, HIDDEN)
        tensors[f"{block}.ffn_up.bias"] = vector(N_FF)
        tensors[f"{block}.ffn_down.weight"] = linear(HIDDEN, N_FF)
        tensors[f"{block}.ffn_down.bias"] = vector(HIDDEN)
    tensors.update({
        "v.post_ln.weight": ones(HIDDEN),
        "v.post_ln.bias": vector(HIDDEN),
        # the LLaVA 1.5 projector: mm.0 (linear), GELU, mm.2 (linear); its output width is the text model's
        "mm.0.weight": linear(n_embd, HIDDEN),
        "mm.0.bias": vector(n_embd),
        "mm.2.weight": linear(n_embd, n_embd),
        "mm.2.bias": vector(n_embd),
    })

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("general.name", "tiny-random-clip-mlp")
    writer.add_string("general.description", "tiny random-weight CLIP + mlp projector, for tests only")
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", False)  # CLIP's quick_gelu in the encoder blocks (the projector's is GELU)
    # every number clip.cpp reads with get_u32 must be a UINT32 (gguf_get_val_u32 asserts the type) and the
    # epsilon a FLOAT32, or the process aborts rather than failing the load
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", HIDDEN)
    writer.add_uint32("clip.vision.feed_forward_length", N_FF)
    writer.add_uint32("clip.vision.block_count", N_BLOCK)
    writer.add_uint32("clip.vision.projection_dim", n_embd)
    writer.add_uint32("clip.vision.attention.head_count", N_HEAD)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", IMAGE_MEAN)  # float lists are written as FLOAT32 arrays
    writer.add_array("clip.vision.image_std", IMAGE_STD)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
