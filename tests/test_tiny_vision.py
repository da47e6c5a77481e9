"""Images on llama.cpp (issue 11, item 5), proved end to end with llama-cpp-python's libmtmd bindings: the tiny
random-weight mmproj from standin/tiny_vision.py (a real CLIP encoder + "mlp" projector GGUF) paired with the real
SmolLM2 GGUF. The projector's weights are random, so what the model says about the picture is nonsense; these
tests prove the path (load, preprocess, tokenize with the media marker, encode, decode the image embeddings into
a sequence, generate after them), not the answer.

Two ways in are checked to agree exactly: libmtmd's helper (mtmd_helper_eval_chunks), and the way a batching
engine can do it on its own llama_batch: mtmd_encode_chunk, then the embeddings in an embd batch for llama_decode.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import llama_cpp as llama
import numpy as np
import pytest
from llama_cpp import mtmd_cpp as mtmd
from standin.tiny_vision import IMAGE_SIZE, N_IMAGE_TOKENS, PATCH_SIZE, write_tiny_mmproj

N_EMBD = 576  # SmolLM2-135M
N_BATCH = 64
THREADS = 2
TEXT, IMAGE = mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT, mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmproj(tmp_path_factory.mktemp("vision") / "mmproj-tiny.gguf", n_embd=N_EMBD)


@pytest.fixture(scope="module")
def model(gguf_path: Path) -> Iterator[Any]:
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    handle = llama.llama_model_load_from_file(str(gguf_path).encode(), params)
    assert handle, f"llama.cpp could not load {gguf_path}"
    yield handle
    llama.llama_model_free(handle)


@pytest.fixture(scope="module")
def vision(mmproj: Path, model: Any) -> Iterator[Any]:
    """The mtmd context; it refers to the text model, so it is freed first (this fixture ends before `model`)."""
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = THREADS
    params.print_timings = False
    params.warmup = False
    handle = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
    assert handle, "mtmd_init_from_file refused the tiny mmproj (see the clip_model_loader lines above)"
    yield handle
    mtmd.mtmd_free(handle)


def new_context(model: Any, n_seq: int = 1) -> Any:
    params = llama.llama_context_default_params()
    params.n_seq_max = n_seq
    params.n_ctx = 256 * n_seq
    params.n_batch = N_BATCH
    params.n_ubatch = N_BATCH
    params.n_threads = THREADS
    params.n_threads_batch = THREADS
    params.kv_unified = False  # as the runner's engine: every sequence has its own cells
    params.no_perf = True
    ctx = llama.llama_init_from_model(model, params)
    assert ctx
    return ctx


def rgb_bitmap(nx: int, ny: int) -> Any:
    """A small generated picture (a colour gradient), RGBRGB... bytes, not square and not the encoder's size:
    libmtmd resizes it to IMAGE_SIZE x IMAGE_SIZE itself."""
    y, x = np.mgrid[0:ny, 0:nx]
    pixels = np.stack([x * 255 // max(nx - 1, 1), y * 255 // max(ny - 1, 1), (x + y) % 256], axis=-1)
    raw = pixels.astype(np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(nx, ny, (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw))
    assert bitmap
    return bitmap


def tokenize(vision: Any, prompt: bytes, bitmaps: list[Any]) -> Any:
    chunks = mtmd.mtmd_input_chunks_init()
    text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)  # add_special, parse_special
    array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
    rc = mtmd.mtmd_tokenize(vision, chunks, ctypes.byref(text), array, len(bitmaps))
    if rc != 0:
        mtmd.mtmd_input_chunks_free(chunks)
        raise AssertionError(f"mtmd_tokenize returned {rc}")
    return chunks


def chat_prompt(question: str) -> bytes:
    """SmolLM2's chat template around a question holding the media marker, so text follows the image."""
    marker = mtmd.mtmd_default_marker().decode()
    return f"<|im_start|>user\n{question.format(image=marker)}<|im_end|>\n<|im_start|>assistant\n".encode()


def chunk_list(chunks: Any) -> list[Any]:
    return [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]


def last_logits(ctx: Any, n_vocab: int) -> np.ndarray:
    pointer = llama.llama_get_logits_ith(ctx, -1)
    assert pointer, "no logits for the last position"
    return np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy()


def greedy(ctx: Any, vocab: Any, n_past: int, seq_id: int, n: int) -> list[int]:
    """Up to `n` greedy tokens after the evaluated prompt; stops after an end-of-generation token."""
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    batch = llama.llama_batch_init(1, 0, 1)
    tokens: list[int] = []
    try:
        for _ in range(n):
            token = int(np.argmax(last_logits(ctx, n_vocab)))
            tokens.append(token)
            if llama.llama_vocab_is_eog(vocab, token):
                break
            batch.n_tokens = 1
            batch.token[0] = token
            batch.pos[0] = n_past
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = seq_id
            batch.logits[0] = 1
            assert llama.llama_decode(ctx, batch) == 0
            n_past += 1
    finally:
        llama.llama_batch_free(batch)
    return tokens


def test_the_tiny_mmproj_is_a_clip_vision_projector(mmproj: Path) -> None:
    reader = gguf.GGUFReader(str(mmproj))
    fields = reader.fields
    assert fields["clip.projector_type"].contents() == "mlp"
    assert fields["clip.has_vision_encoder"].contents() is True
    assert fields["clip.vision.image_size"].contents() == IMAGE_SIZE
    assert fields["clip.vision.patch_size"].contents() == PATCH_SIZE
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (in, out)
    assert shapes["mm.2.weight"] == (N_EMBD, N_EMBD)
    assert shapes["v.position_embd.weight"][1] == N_IMAGE_TOKENS + 1  # the patches and the class embedding
    caps = mtmd.mtmd_get_cap_from_file(str(mmproj).encode())
    assert caps.inp_vision and not caps.inp_audio


@pytest.mark.slow
def test_an_image_prompt_evaluates_and_generates(model: Any, vision: Any) -> None:
    """The image path with libmtmd's helper: tokenize text + image into chunks, eval them into sequence 0, then
    greedy tokens. The tokens are nonsense (random projector); that they come at all is the point."""
    assert mtmd.mtmd_support_vision(vision)
    assert not mtmd.mtmd_decode_use_mrope(vision)
    assert not mtmd.mtmd_decode_use_non_causal(vision, None)  # "mlp" (LLaVA): image tokens attend causally
    vocab = llama.llama_model_get_vocab(model)
    ctx = new_context(model)
    bitmap = rgb_bitmap(40, 24)
    chunks = tokenize(vision, chat_prompt("What is in {image}? Answer briefly."), [bitmap])
    try:
        parts = chunk_list(chunks)
        assert [mtmd.mtmd_input_chunk_get_type(c) for c in parts] == [TEXT, IMAGE, TEXT]
        image = parts[1]
        n_image = mtmd.mtmd_input_chunk_get_n_tokens(image)
        assert n_image == N_IMAGE_TOKENS > 0
        assert mtmd.mtmd_image_tokens_get_n_tokens(mtmd.mtmd_input_chunk_get_tokens_image(image)) == n_image
        n_total = mtmd.mtmd_helper_get_n_tokens(chunks)
        assert n_total == sum(mtmd.mtmd_input_chunk_get_n_tokens(c) for c in parts)
        assert mtmd.mtmd_helper_get_n_pos(chunks) == n_total  # no M-RoPE: one position per token

        new_n_past = llama.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(vision, ctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(new_n_past))
        assert rc == 0
        assert new_n_past.value == n_total
        assert np.isfinite(last_logits(ctx, llama.llama_vocab_n_tokens(vocab))).all()

        generated = greedy(ctx, vocab, new_n_past.value, 0, 8)
        assert generated and all(0 <= t < llama.llama_vocab_n_tokens(vocab) for t in generated)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        llama.llama_free(ctx)


@pytest.mark.slow
def test_encode_then_an_embedding_batch_matches_the_helper(model: Any, vision: Any) -> None:
    """What a batching engine does instead of the helper: text chunks as token batches, each image chunk encoded
    with mtmd_encode_chunk and its rows decoded as an embd batch (llama_batch_init(n, n_embd, 1)), here into
    sequence 1 of a two-sequence context. The logits after the prompt equal the helper's on sequence 0 of a
    fresh context; and a prompt must end in text, as an image batch asks for no logits."""
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    n_embd = llama.llama_model_n_embd(model)
    bitmap = rgb_bitmap(32, 48)
    chunks = tokenize(vision, chat_prompt("Describe {image} in one word."), [bitmap])
    helper_ctx = new_context(model)
    engine_ctx = new_context(model, n_seq=2)
    tokens = llama.llama_batch_init(N_BATCH, 0, 1)
    embds = llama.llama_batch_init(N_BATCH, n_embd, 1)
    try:
        new_n_past = llama.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(
            vision, helper_ctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(new_n_past)) == 0
        expected = last_logits(helper_ctx, n_vocab)

        seq_id, n_past = 1, 0
        parts = chunk_list(chunks)
        for i, chunk in enumerate(parts):
            if mtmd.mtmd_input_chunk_get_type(chunk) == TEXT:
                n = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                batch, count = tokens, n.value
                for j in range(count):
                    batch.token[j] = ids[j]
            else:
                assert mtmd.mtmd_encode_chunk(vision, chunk) == 0
                count = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                rows = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(vision), shape=(count * n_embd,))
                assert np.isfinite(rows).all() and np.abs(rows).max() > 0
                batch = embds
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            assert count <= N_BATCH
            for j in range(count):
                batch.pos[j] = n_past + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seq_id
                batch.logits[j] = int(i == len(parts) - 1 and j == count - 1)
            batch.n_tokens = count
            assert llama.llama_decode(engine_ctx, batch) == 0
            n_past += mtmd.mtmd_input_chunk_get_n_pos(chunk)
        assert n_past == new_n_past.value
        np.testing.assert_allclose(last_logits(engine_ctx, n_vocab), expected, rtol=0, atol=1e-4)
        assert greedy(engine_ctx, vocab, n_past, seq_id, 4) == greedy(helper_ctx, vocab, n_past, 0, 4)
    finally:
        llama.llama_batch_free(tokens)
        llama.llama_batch_free(embds)
        llama.llama_free(engine_ctx)
        llama.llama_free(helper_ctx)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


@pytest.mark.slow
def test_a_prompt_ending_in_an_image_leaves_no_logits(model: Any, vision: Any) -> None:
    """mtmd_helper_eval_chunks' logits_last only marks a final text token: after a final image there is nothing
    to sample from. A runner must keep text after the image (a chat template's assistant header does)."""
    ctx = new_context(model)
    bitmap = rgb_bitmap(16, 16)
    chunks = tokenize(vision, b"Look: " + mtmd.mtmd_default_marker(), [bitmap])
    try:
        new_n_past = llama.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(vision, ctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(new_n_past)) == 0
        assert new_n_past.value == mtmd.mtmd_helper_get_n_tokens(chunks)
        assert not llama.llama_get_logits_ith(ctx, -1)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        llama.llama_free(ctx)


@pytest.mark.slow
def test_a_missing_image_is_refused(vision: Any) -> None:
    """A media marker with no bitmap for it is an error from mtmd_tokenize (2 here, not the header's 1)."""
    chunks = mtmd.mtmd_input_chunks_init()
    prompt = chat_prompt("What is in {image}?")
    text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
    try:
        assert mtmd.mtmd_tokenize(vision, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(), 0) != 0
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
