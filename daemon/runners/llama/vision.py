"""A vision model's projector (its mmproj GGUF) as a libmtmd context, and the prefill of a prompt with images.

Loaded after the model, on the engine thread. A request with images is prefilled whole when it takes its slot:
its bitmaps decoded from the image bytes, its prompt (libmtmd's media marker where each image goes) tokenized
by mtmd_tokenize into text and image chunks, and the chunks evaluated into the slot's own sequence by
mtmd_helper_eval_chunks (text in token batches; each image encoded by the projector and its embeddings decoded
in a batch of their own, since embeddings cannot share a batch with tokens). The engine then samples the first
token from that decode's last logits, and the sequence generates in the ordinary batched steps.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from typing import Any

import llama_cpp as llama
from llama_cpp import mtmd_cpp as mtmd

from .sampling import BadRequest

log = logging.getLogger("mgr.runner")

# The image formats libmtmd's stb_image decodes (by their first bytes); anything else is refused before it is tried.
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
# libmtmd's buffer helper tries a buffer that is no image as audio, then as video through ffprobe: pointed at a
# folder that does not exist, it launches nothing.
NO_FFMPEG = b"/nonexistent/mgr-no-ffmpeg"
_GGML_LOG_WARN, _GGML_LOG_CONT = 3, 5
_mtmd_log_kept = [True]  # whether the last line was kept (a CONT line continues it)


def _mtmd_log(level: int, text: bytes | None, _: Any) -> None:
    """libmtmd's log: warnings and errors only (at INFO it writes every prompt's text, per request)."""
    keep = _mtmd_log_kept[0] if level == _GGML_LOG_CONT else level >= _GGML_LOG_WARN
    _mtmd_log_kept[0] = keep
    if keep and text:
        os.write(2, text)


_MTMD_LOG = llama.llama_log_callback(_mtmd_log)  # kept alive for as long as libmtmd may call it


class Vision:
    """The mtmd context of one projector; `free` it before the model it refers to."""

    def __init__(self, path: str, model: Any, use_gpu: bool, n_threads: int) -> None:
        mtmd.mtmd_log_set(_MTMD_LOG, None)
        mtmd.mtmd_helper_log_set(_MTMD_LOG, None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu  # the projector goes where the model's layers went
        params.n_threads = n_threads
        params.print_timings = False
        context = mtmd.mtmd_init_from_file(path.encode(), model, params)
        if not context:
            raise RuntimeError(f"the vision projector {path} could not be loaded for this model (a projector made "
                               "for another model, or not a projector: see the lines above)")
        if not mtmd.mtmd_support_vision(context):
            mtmd.mtmd_free(context)
            raise RuntimeError(f"the projector {path} has no vision encoder")
        self.context = context
        self.marker = (mtmd.mtmd_get_marker(context) or mtmd.mtmd_default_marker()).decode()
        log.info("vision projector %s loaded (%s)", path, "GPU" if use_gpu else "CPU")

    def free(self) -> None:
        mtmd.mtmd_free(self.context)

    def prefill(self, prompt: str, add_special: bool, images: Sequence[bytes], ctx: Any, seq_id: int, n_ctx_seq: int,
                n_batch: int) -> tuple[int, int]:
        """Evaluate `prompt` (a marker per image) with its images into sequence `seq_id` of `ctx`; returns the
        prompt's tokens (text and image) and the next position. BadRequest for what the client can fix (an
        image that does not decode, markers and images that do not match, no room in the context)."""
        bitmaps: list[Any] = []
        chunks = None
        try:
            for i, data in enumerate(images):
                bitmaps.append(self._bitmap(data, i))
            chunks = self._chunks(prompt, add_special, bitmaps)
            n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
            n_past = mtmd.mtmd_helper_get_n_pos(chunks)
            if n_past + 1 >= n_ctx_seq:
                raise BadRequest(f"the prompt has {n_tokens} tokens with its images, more than this model's "
                                 f"context of {n_ctx_seq} (raise num_ctx, or send fewer or smaller images)")
            n_chunks = mtmd.mtmd_input_chunks_size(chunks)
            last = mtmd.mtmd_input_chunks_get(chunks, n_chunks - 1)
            if mtmd.mtmd_input_chunk_get_type(last) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                raise BadRequest("the prompt must end in text after its last image")
            if mtmd.mtmd_decode_use_non_causal(self.context, None):
                for i in range(n_chunks):  # a non-causal image must be decoded in one ubatch
                    if mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i)) > n_batch:
                        raise BadRequest(f"an image takes more tokens than this runner's batch of {n_batch}")
            new_n_past = llama.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunks(self.context, ctx, chunks, 0, seq_id, n_batch, True,
                                              ctypes.byref(new_n_past))
            if rc != 0:
                raise RuntimeError(f"evaluating the image prompt failed with code {rc}")
            return int(n_tokens), int(new_n_past.value)
        finally:
            if chunks is not None:
                mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, data: bytes, index: int) -> Any:
        """An image file's bytes (PNG, JPEG, GIF, BMP) decoded into an mtmd bitmap, or a BadRequest."""
        if not data.startswith(IMAGE_MAGIC):
            raise BadRequest(f"image {index + 1} is not a PNG, JPEG, GIF or BMP image")
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        options = mtmd.mtmd_helper_init_opt_default()
        options.video_params.ffmpeg_bin_dir = NO_FFMPEG
        decoded = mtmd.mtmd_helper_bitmap_init_from_buf_wrapper(self.context, buffer, len(data), False, options)
        if decoded.video_ctx:
            mtmd.mtmd_helper_video_free(decoded.video_ctx)
        bitmap = decoded.bitmap
        if bitmap and mtmd.mtmd_bitmap_is_audio(bitmap):
            mtmd.mtmd_bitmap_free(bitmap)
            bitmap = None
        if not bitmap:
            raise BadRequest(f"image {index + 1} could not be decoded")
        return bitmap

    def _chunks(self, text: str, add_special: bool, bitmaps: list[Any]) -> Any:
        """The prompt (a media marker per image) tokenized by libmtmd into text and image chunks."""
        data = text.encode("utf-8")
        chunks = mtmd.mtmd_input_chunks_init()
        if not chunks:
            raise RuntimeError("libmtmd could not allocate input chunks")
        prompt = mtmd.mtmd_input_text(data, len(data), add_special, True)
        array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        rc = mtmd.mtmd_tokenize(self.context, chunks, ctypes.byref(prompt), array, len(bitmaps))
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise BadRequest(f"the prompt's images could not be read (the number of images must match the "
                             f"image places in the prompt; libmtmd's code {rc})")
        return chunks
