"""Fitting a chat into the context when the client allows truncation: the oldest messages are dropped (system
messages and the last message always stay) until the rendered prompt leaves room to generate.

Runs in a worker thread of the request's handler, never on the engine thread, and in about linear time. Dropping
one message at a time meant one render and one tokenization of the whole conversation per message, on the engine
thread: a 300-message chat took 42 s while every other client of the model waited. Here the number of oldest
messages to drop is estimated from the messages' sizes (characters, at the rendered prompt's tokens per
character), then settled by rendering a few candidates around the estimate: usually two or three renders,
O(log n) at worst. The answer is the fewest messages dropped whose prompt fits, as before, assuming (as before)
that dropping more never makes a prompt longer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .sampling import BadRequest

Render = Callable[[list[dict[str, Any]]], str]
Tokenize = Callable[[str], list[int]]


class Fitted:
    """The prompt that fits: its text, its tokens, and how many tokens the dropped messages took."""

    def __init__(self, text: str, tokens: list[int], dropped: int) -> None:
        self.text = text
        self.tokens = tokens
        self.dropped = dropped


def fit(messages: list[dict[str, Any]], render: Render, tokenize: Tokenize, n_ctx: int) -> Fitted:
    """The conversation's prompt, with its oldest messages dropped if it does not fit in `n_ctx` tokens (one
    left to generate); BadRequest when even the system messages and the last message do not fit."""
    text = render(messages)
    tokens = tokenize(text)
    n_full = len(tokens)
    if n_full < n_ctx:
        return Fitted(text, tokens, 0)
    system = [m for m in messages if m.get("role") == "system"]
    rest = [m for m in messages if m.get("role") != "system"]
    most = len(rest) - 1  # the last message always stays
    tried: dict[int, Fitted | None] = {}
    refused: dict[int, BadRequest] = {}

    def fitting(k: int) -> Fitted | None:
        """The prompt without the k oldest non-system messages, when it fits. A conversation the template
        refuses (some insist that roles alternate from a user message) counts as one that does not fit."""
        if k not in tried:
            try:
                shorter = render(system + rest[k:])
            except BadRequest as e:
                tried[k], refused[k] = None, e
                return None
            shorter_tokens = tokenize(shorter)
            tried[k] = Fitted(shorter, shorter_tokens, n_full - len(shorter_tokens)) \
                if len(shorter_tokens) < n_ctx else None
        return tried[k]

    if most >= 1 and fitting(most) is None and most in refused:
        raise refused[most]
    if most < 1 or fitting(most) is None:
        raise BadRequest(f"the prompt has {n_full} tokens, more than this model's context of {n_ctx}, and stays "
                         "too long with only the system messages and the last message (raise num_ctx or shorten "
                         "them)")
    # k = 0 (nothing dropped) is known not to fit, k = most is known to fit; narrow that down from the estimate.
    low, high = 0, most
    guess = min(max(_estimate(text, n_full, n_ctx, system, rest), 1), most)
    step = 1
    if fitting(guess) is not None:  # gallop towards fewer drops
        high = guess
        while high - step > low and fitting(high - step) is not None:
            high -= step
            step *= 2
        low = max(low, high - step)
    else:  # gallop towards more
        low = guess
        while low + step < high and fitting(low + step) is None:
            low += step
            step *= 2
        high = min(high, low + step)
    while high - low > 1:
        middle = (low + high) // 2
        if fitting(middle) is not None:
            high = middle
        else:
            low = middle
    fitted = fitting(high)
    assert fitted is not None
    return fitted


def _estimate(text: str, n_full: int, n_ctx: int, system: list[dict[str, Any]], rest: list[dict[str, Any]]) -> int:
    """How many of the oldest messages to drop, from their sizes: each message costs its characters plus an
    equal share of the template's own text, at the rendered prompt's tokens per character."""
    sizes = [_size(m) for m in rest]
    overhead = max(0, len(text) - sum(sizes) - sum(_size(m) for m in system)) / max(1, len(system) + len(rest))
    per_char = n_full / max(1, len(text))
    excess = n_full - (n_ctx - 1)
    dropped, k = 0.0, 0
    while k < len(sizes) and dropped < excess:
        dropped += (sizes[k] + overhead) * per_char
        k += 1
    return k


def _size(message: dict[str, Any]) -> int:
    size = len(str(message.get("content") or ""))
    if message.get("tool_calls"):
        size += len(json.dumps(message["tool_calls"], ensure_ascii=False))
    return size
