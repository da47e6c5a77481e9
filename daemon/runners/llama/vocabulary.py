"""A model's vocabulary: tokenizing, tokens' text, and the special tokens' texts a runner needs (BOS, EOS, the
fill-in-the-middle tokens, the output markers that are control tokens, the end-of-generation tokens).

`tokenize` may be called from any thread (a request's handler tokenizes its prompt off the engine thread);
`piece` reuses one buffer and belongs to the engine thread."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

import llama_cpp as llama


class Vocabulary:
    def __init__(self, model: Any, markers: Iterable[str]) -> None:
        self.vocab = llama.llama_model_get_vocab(model)
        vocab = self.vocab
        self.n_vocab: int = llama.llama_vocab_n_tokens(vocab)
        self.bos_text = self.special_text(llama.llama_vocab_bos(vocab))
        self.eos_text = self.special_text(llama.llama_vocab_eos(vocab))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(vocab))
        fim = [self.special_text(llama.llama_vocab_fim_pre(vocab)), self.special_text(llama.llama_vocab_fim_suf(vocab)),
               self.special_text(llama.llama_vocab_fim_mid(vocab))]
        self.fim = (fim[0], fim[1], fim[2]) if all(fim) else None  # the FIM prefix, suffix and middle tokens' texts
        self.controls: dict[str, int] = {}  # the markers that are control tokens (rendered as nothing unless asked)
        for text in markers:
            tokens = self.tokenize(text, False)
            if len(tokens) == 1 and llama.llama_vocab_get_attr(vocab, tokens[0]) & llama.LLAMA_TOKEN_ATTR_CONTROL:
                self.controls[text] = tokens[0]
        self.eog_tokens = [t for t in range(self.n_vocab) if llama.llama_vocab_is_eog(vocab, t)]
        self._piece_buffer = ctypes.create_string_buffer(256)

    def special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = llama.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, True)
        if n < 0:
            capacity = -n
            tokens = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, True)
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """A token's text; control tokens render as nothing. Engine thread only (one shared buffer)."""
        n = llama.llama_token_to_piece(self.vocab, token, self._piece_buffer, 256, 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
            return buffer.raw[:n]
        return self._piece_buffer.raw[:n]

    def piece_special(self, token: int) -> bytes:
        """A token's text, control tokens included."""
        buffer = ctypes.create_string_buffer(256)
        n = llama.llama_token_to_piece(self.vocab, token, buffer, 256, 0, True)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buffer, -n, 0, True)
        return buffer.raw[:n]
