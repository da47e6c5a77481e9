"""Embeddings on a second llama.cpp context of the same model, made on first use by the engine thread.

Pooling comes from the GGUF (`<arch>.pooling_type`, set for embedding models); a generative model has none,
and gets mean pooling, as Ollama does. Inputs are batched: as many sequences as fit in one decode (n_batch
tokens, n_seq_max sequences) go together. Vectors are L2-normalized, as OpenAI's and Ollama's are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import llama_cpp as llama

from .sampling import BadRequest

MAX_SEQUENCES = 16
MAX_TOKENS_PER_INPUT = 2048


def put_token(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Write entry i of a llama_batch: one token of one sequence at a position (logits: output wanted)."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits


class Embedder:
    def __init__(self, model: Any, n_ctx_per_seq: int, n_threads: int,
                 tokenize: Callable[[str, bool], list[int]]) -> None:
        self.tokenize = tokenize
        self.n_tokens = min(n_ctx_per_seq, MAX_TOKENS_PER_INPUT)
        params = llama.llama_context_default_params()
        params.embeddings = True  # pooling_type stays UNSPECIFIED: the model's own, from its metadata
        params.n_seq_max = MAX_SEQUENCES
        params.n_ctx = self.n_tokens * MAX_SEQUENCES
        # A pooled sequence must sit in one micro-batch, so the micro-batch holds a whole input.
        params.n_batch = params.n_ubatch = self.n_tokens
        params.n_threads = params.n_threads_batch = n_threads
        # One KV stream: with a stream per sequence, llama.cpp splits sequences of unequal length across
        # micro-batches, which breaks pooling (measured: vectors of all but the last sequence changed).
        # The attention mask still keeps sequences apart.
        params.kv_unified = True
        params.no_perf = True
        self.ctx = llama.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create an embedding context")
        if llama.llama_pooling_type(self.ctx) == llama.LLAMA_POOLING_TYPE_NONE:
            # the model declares no pooling: a generative model. Mean-pool instead.
            llama.llama_free(self.ctx)
            params.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
            self.ctx = llama.llama_init_from_model(model, params)
            if not self.ctx:
                raise RuntimeError("llama.cpp could not create an embedding context")
        self.n_embd: int = llama.llama_model_n_embd(model)
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(self.n_tokens, 0, 1)

    def free(self) -> None:
        llama.llama_batch_free(self.batch)
        llama.llama_free(self.ctx)

    def embed(self, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        token_lists: list[list[int]] = []
        for i, text in enumerate(inputs):
            tokens = self.tokenize(text, True)
            if not tokens:
                raise BadRequest(f"input[{i}] is empty")
            if len(tokens) > self.n_tokens:
                if not truncate:
                    raise BadRequest(f"input[{i}] has {len(tokens)} tokens, more than the {self.n_tokens} "
                                     "an embedding takes (allow truncation or shorten it)")
                tokens = tokens[: self.n_tokens]
            token_lists.append(tokens)
        vectors: list[list[float]] = []
        start = 0
        while start < len(token_lists):
            group: list[list[int]] = []
            used = 0
            for tokens in token_lists[start:]:
                if len(group) == MAX_SEQUENCES or used + len(tokens) > self.n_tokens:
                    break
                group.append(tokens)
                used += len(tokens)
            vectors += self._decode(group)
            start += len(group)
        return vectors, sum(len(t) for t in token_lists)

    def _decode(self, group: list[list[int]]) -> list[list[float]]:
        batch, n = self.batch, 0
        for seq_id, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                put_token(batch, n, token, pos, seq_id, pos == len(tokens) - 1)
                n += 1
        batch.n_tokens = n
        llama.llama_memory_clear(self.memory, True)
        rc = llama.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} while embedding")
        result: list[list[float]] = []
        for seq_id in range(len(group)):
            pointer = llama.llama_get_embeddings_seq(self.ctx, seq_id)
            vector = [float(pointer[i]) for i in range(self.n_embd)]
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            result.append([v / norm for v in vector])
        return result
