"""The prompt cache: each sequence slot keeps its KV cells after its request ends, and a new request takes the free
slot whose cells already hold the longest prefix of its prompt, so a growing chat reads only its new tokens.

As llama-server's `cache_prompt` (on by default) with `--slot-prompt-similarity 0.1`: a free slot counts as a
match when the prefix it shares is more than a tenth of the prompt. With no match, the slot is chosen to keep the
busy sequence ids in as few runs of consecutive ids as it can, and among those the least recently used (one never
used first: so the least recently used cache is the one dropped); whatever prefix that slot shares is still
reused. Why runs: with a KV cache that is not unified, llama_decode splits a batch into one micro-batch (one pass
over the weights) per run of consecutive sequence ids (llama_batch_allocr::split_equal, sequential), so four
generating sequences 0, 5, 9, 13 cost four passes a step where 0, 1, 2, 3 cost one (measured here: 33 against
21 ms a step on the CPU, 66 against 36 ms for eight; on the H200 mgr fell to 0.6 of llama-server at 4 and 8
clients, as plain LRU scattered the slots). Taking a slot removes its cells past the reused prefix
(llama_memory_seq_rm).

Unlike llama-server's, answers stay byte-identical to a cold run's (EXACT_ROWS says how): a slot offers only the
prompt tokens whose cells a cold run would have computed the same, and the last EXACT_ROWS tokens of a prompt are
always decoded again (the last one's logits are what the first sampled token needs).

An image prompt's cells hold image embeddings that no token list describes: such a slot is cleared when it is
given back, and an image prompt always starts from a cleared slot. A memory that cannot drop a suffix (recurrent
or hybrid models) or that no longer holds the prefix's first positions (a sliding window kept short) is cleared
whole: the prompt is then read from its start, as without a cache.

Used on the engine thread only; `held` (tokens idle slots offer) is an int that /health reads from any thread.
"""

from __future__ import annotations

from typing import Any

import llama_cpp as llama

MIN_SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default
# llama.cpp's CPU kernels (flash attention's above all) take another path for fewer than 64 rows of one sequence in
# a micro-batch, with other rounding: measured on SmolLM2, a prompt decoded as [n-63, 63] or token by token gave
# logits up to 0.6 apart from the same prompt decoded whole, while any split into parts of 64 or more gave the same
# bits. So cells are offered again only for prompt tokens decoded in parts of at least EXACT_ROWS, alone in their
# batch (never generated tokens, decoded one at a time), and at least EXACT_ROWS of a prompt are decoded again:
# greedy answers then stay byte-identical to a cold run's, for the price of re-reading the last answer.
EXACT_ROWS = 64


class SlotCache:
    """Which sequence slots are free, what each free slot's KV cells hold, and which one a prompt takes."""

    def __init__(self, memory: Any, n_parallel: int, enabled: bool = True) -> None:
        self.memory = memory
        self.enabled = enabled  # False: every slot is cleared when given back (the runner's --no-cache-prompt)
        self._tokens: list[list[int]] = [[] for _ in range(n_parallel)]  # what each free slot's cells hold
        self._last_used = [0] * n_parallel  # when each slot was last given back (a counter; 0 = never used)
        self._free = set(range(n_parallel))
        self._clock = 0
        self.held = 0  # tokens held in free slots' cells, for /health and /api/ps

    def __len__(self) -> int:
        """Free slots."""
        return len(self._free)

    def take(self, prompt: list[int] | None, reuse: bool = True) -> tuple[int, int]:
        """A free slot for `prompt` (None: an image prompt), and how many of the prompt's first tokens its cells
        hold already, which the caller does not decode again (0 when `reuse` is false: llama-server's
        `cache_prompt: false`; 0 for a prompt shorter than 2 x EXACT_ROWS)."""
        seq_id = choose_slot(self._free, self._last_used, self._tokens, prompt if reuse and self.enabled else None)
        self._free.discard(seq_id)
        keep = 0
        if prompt is not None and reuse and self.enabled:
            keep = min(common_prefix(self._tokens[seq_id], prompt), len(prompt) - EXACT_ROWS)
        if not (keep > 0 and self._keep(seq_id, keep)):
            keep = 0
            llama.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        self._set_tokens(seq_id, [])
        return seq_id, keep

    def give_back(self, seq_id: int, tokens: list[int] | None) -> None:
        """A slot is free again; `tokens`: the first tokens its cells hold that a later prompt may reuse (None:
        nothing, and the cells are cleared)."""
        if tokens is None or not self.enabled:
            llama.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
            tokens = []
        self._set_tokens(seq_id, tokens)
        self._clock += 1
        self._last_used[seq_id] = self._clock
        self._free.add(seq_id)

    def reclaim(self, occupied: set[int]) -> None:
        """Give back, cleared, the slots taken but never occupied (a request that failed while it started)."""
        for seq_id in set(range(len(self._tokens))) - occupied - self._free:
            self.give_back(seq_id, None)

    def _keep(self, seq_id: int, n: int) -> bool:
        """Drop the slot's cells from position `n` on; False when this memory cannot keep the first `n`."""
        if not llama.llama_memory_seq_rm(self.memory, seq_id, n, -1):
            return False  # recurrent and hybrid memories cannot drop a suffix
        return int(llama.llama_memory_seq_pos_min(self.memory, seq_id)) == 0  # a window may have dropped the start

    def _set_tokens(self, seq_id: int, tokens: list[int]) -> None:
        self.held += len(tokens) - len(self._tokens[seq_id])
        self._tokens[seq_id] = tokens


def choose_slot(free: set[int], last_used: list[int], tokens: list[list[int]], prompt: list[int] | None) -> int:
    """The free slot sharing the longest prefix with `prompt` (more than MIN_SIMILARITY of it); else the one that
    splits the busy sequence ids into the fewest runs (it fills a gap between two busy ids, or extends a run),
    the least recently used among equals, the lowest id among those."""
    best, best_shared = -1, 0
    if prompt:
        for seq_id in sorted(free):
            shared = common_prefix(tokens[seq_id], prompt)
            if shared > best_shared and shared > MIN_SIMILARITY * len(prompt):
                best, best_shared = seq_id, shared
    if best >= 0:
        return best
    n = len(tokens)

    def new_runs(s: int) -> int:  # +1: a run of its own, 0: extends one, -1: joins two
        return 1 - (s > 0 and s - 1 not in free) - (s + 1 < n and s + 1 not in free)

    return min(free, key=lambda s: (new_runs(s), last_used[s], s))


def exact_chunk(remaining: int, budget: int) -> int:
    """How many of a prompt's `remaining` tokens to decode in a step that has room for `budget`: all that fit, but
    never leaving a last part shorter than EXACT_ROWS where the prompt allows (a cold run reads it in one part)."""
    take = min(budget, remaining)
    if 0 < remaining - take < EXACT_ROWS <= remaining - EXACT_ROWS:
        take = remaining - EXACT_ROWS
    return take


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case for a growing chat: one comparison in C
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]: halve the range
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low
