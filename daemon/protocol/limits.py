"""Where the runner protocol's numeric fields must lie: the daemon checks every API's request against these before
it takes a lease (a bad value is a 400 before a model loads), and the runners check the same again.

The llama.cpp runner takes them as C ints and floats, where a value past 32 bits is undefined and some sizes are
allocations (repeat_last_n is a ring buffer per request). Model-relative bounds (repeat_last_n at most the
context, top_k at most the vocabulary, dimensions at most the embedding's) are the runner's to check, as only it
knows the model. The llama.cpp runner checks these same numbers again (runners/llama/sampling.py).

Stdlib only (a protocol leaf).
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1

# field (the runner protocol's name) -> (lowest, highest), inclusive
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 100.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "typical_p": (0.0, 1.0),
    "repetition_penalty": (1e-6, 100.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
    "top_k": (-1, INT32_MAX), "repeat_last_n": (-1, INT32_MAX), "seed": (-(2**63), 2**64 - 1),
}
INTEGER_FIELDS = frozenset({"top_k", "repeat_last_n", "seed"})
MAX_TOKENS_RANGE = (-1, INT32_MAX)  # -1 (and, from Ollama, -2): no limit but the context
MAX_CHOICES = 128  # n
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, completions' logprobs (vLLM's bound)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range, either way
MAX_DIMENSIONS = 1 << 16  # an embedding's dimensions; the runner bounds it by the model's own
