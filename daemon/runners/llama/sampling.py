"""Per-request sampling: parameters, the llama.cpp sampler chain built from them, and stop strings.

Defaults follow the OpenAI/vLLM request semantics (the runner speaks that protocol); the Ollama adapter in the
daemon fills in Ollama's own defaults before a request reaches the runner.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from typing import Any

import llama_cpp as llama
from llama_cpp import llama_grammar

from ...protocol.limits import MAX_LOGIT_BIAS, SAMPLING_RANGES

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed per sampler
# Where each sampling field must lie (inclusive; protocol/limits.py, which the daemon checks too); outside, the
# request is a 400. llama.cpp takes them as C ints and floats: a NaN, an infinity or a value past 32 bits is
# undefined there, and some sizes are allocations (repeat_last_n is a ring buffer per request: 50,000,000 asked
# for hundreds of MiB). Model-relative bounds (repeat_last_n at most the context, top_k at most the vocabulary)
# are checked against the loaded model.
RANGES = SAMPLING_RANGES
MAX_STOPS = 16  # each is matched against the text held back at every token, on the engine thread
MAX_STOP_CHARS = 256
# A raw GBNF grammar: llama.cpp parses nested groups and follows rule references recursively in C, so a deep
# one overflows the engine thread's stack (a grammar nested 100,000 deep ended the runner with SIGSEGV).
MAX_GRAMMAR_CHARS = 128 * 1024
MAX_GRAMMAR_DEPTH = 128
MAX_GRAMMAR_RULES = 4096


class BadRequest(ValueError):
    """A request the runner refuses; the HTTP layer answers 400 with this message."""


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    grammar: str | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    cache_prompt: bool = True  # llama-server's: false reads the whole prompt, whatever its slot holds

    @classmethod
    def from_request(cls, body: dict[str, Any], *, n_ctx: int = 0, n_vocab: int = 0) -> SamplingParams:
        """The sampling fields of an OpenAI/vLLM body, each checked against RANGES, and against the loaded
        model's context (`n_ctx`) and vocabulary (`n_vocab`) where those are given."""
        params = cls()
        numeric = {
            "temperature": float, "top_k": int, "top_p": float, "min_p": float, "typical_p": float,
            "repetition_penalty": float, "repeat_last_n": int, "presence_penalty": float,
            "frequency_penalty": float, "seed": int,
        }
        if "repetition_penalty" not in body and "repeat_penalty" in body:
            body = {**body, "repetition_penalty": body["repeat_penalty"]}  # llama-server's spelling
        for key, kind in numeric.items():
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"{key} must be a number, got {value!r}")
            low, high = RANGES[key]
            if key == "repeat_last_n" and n_ctx:
                high = n_ctx
            elif key == "top_k" and n_vocab:
                high = n_vocab
            if not low <= value <= high:  # also false for NaN
                raise BadRequest(f"{key} must be from {_number(low)} to {_number(high)}, got {value!r}")
            setattr(params, key, kind(value))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
                raise BadRequest(f"max_tokens must be an integer, got {max_tokens!r}")
            params.max_tokens = max_tokens if max_tokens >= 0 else None
        stop = body.get("stop")
        if isinstance(stop, str):
            params.stop = [stop] if stop else []
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            params.stop = [s for s in stop if s]
        elif stop is not None:
            raise BadRequest("stop must be a string or a list of strings")
        if len(params.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in params.stop):
            raise BadRequest(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each")
        params.grammar = grammar_from_request(body)
        params.ignore_eos = bool(body.get("ignore_eos", False))
        cache_prompt = body.get("cache_prompt", True)
        if not isinstance(cache_prompt, bool):
            raise BadRequest("cache_prompt must be true or false")
        params.cache_prompt = cache_prompt
        bias = body.get("logit_bias") or {}
        if not isinstance(bias, dict):
            raise BadRequest("logit_bias must map token ids to biases")
        try:
            params.logit_bias = {int(token): float(value) for token, value in bias.items()}
        except (TypeError, ValueError, OverflowError):
            raise BadRequest("logit_bias must map token ids to numbers") from None
        if not all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for b in params.logit_bias.values()):
            raise BadRequest(f"logit_bias values must be from -{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}")
        if params.top_k < 0:
            params.top_k = 0
        if params.repeat_last_n < 0:  # llama.cpp's and Ollama's -1: the whole context
            params.repeat_last_n = n_ctx or 64
        return params

    @property
    def plain_greedy(self) -> bool:
        """Greedy, and nothing else shapes the logits but ignore_eos's ban on end tokens: the engine can take the
        argmax itself (the chain, built all the same, answers where the argmax is a banned end token)."""
        return (self.temperature <= 0 and not self.grammar and not self.logit_bias
                and self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty)

    def build_chain(self, vocab: Any, n_vocab: int, eog_tokens: Collection[int]) -> Any:
        """A llama.cpp sampler chain; the caller frees it with llama_sampler_free."""
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama.llama_sampler_chain_add(chain, sampler)

        bias = {t: b for t, b in self.logit_bias.items() if 0 <= t < n_vocab}  # OpenAI's logit_bias
        if self.ignore_eos:  # vLLM's and llama-server's ignore_eos: never end on EOS
            bias.update({token: float("-inf") for token in eog_tokens})
        if bias:
            entries = (llama.llama_logit_bias * len(bias))(*(llama.llama_logit_bias(t, b) for t, b in bias.items()))
            add(llama.llama_sampler_init_logit_bias(n_vocab, len(bias), entries))
        if self.grammar:
            grammar = llama.llama_sampler_init_grammar(vocab, self.grammar.encode(), b"root")
            if not grammar:
                llama.llama_sampler_free(chain)
                raise BadRequest("the output format could not be turned into a grammar")
            add(grammar)
        if self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty:
            add(llama.llama_sampler_init_penalties(
                n_vocab, self.repeat_last_n, self.repetition_penalty, self.frequency_penalty,
                self.presence_penalty,
            ))
        if self.temperature <= 0:
            add(llama.llama_sampler_init_greedy())
            return chain
        if self.top_k > 0:
            add(llama.llama_sampler_init_top_k(self.top_k))
        if self.typical_p < 1.0:
            add(llama.llama_sampler_init_typical(self.typical_p, 1))
        if self.top_p < 1.0:
            add(llama.llama_sampler_init_top_p(self.top_p, 1))
        if self.min_p > 0.0:
            add(llama.llama_sampler_init_min_p(self.min_p, 1))
        add(llama.llama_sampler_init_temp(self.temperature))
        add(llama.llama_sampler_init_dist(DEFAULT_SEED if self.seed is None else self.seed & 0xFFFFFFFF))
        return chain


def grammar_from_request(body: dict[str, Any]) -> str | None:
    """GBNF for OpenAI's response_format (json_object / json_schema) or a raw `grammar` field."""
    grammar = body.get("grammar")
    if isinstance(grammar, str):
        check_grammar(grammar)
        return grammar
    if grammar is not None:
        raise BadRequest("grammar must be a string (GBNF)")
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    schema = (fmt.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
    try:
        gbnf: str = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises plain exceptions for unsupported schemas
        raise BadRequest(f"unsupported JSON schema: {e}") from None
    return json_strings_only(gbnf)


# llama-cpp-python's schema converter lets a string hold raw control characters (its `char` rule is [^"\\]), which
# JSON forbids: a model answering a schema ran on past a value's end ("Paris }\n\nPronounced...") and the answer
# did not parse. llama.cpp's own converter excludes them, as JSON_GBNF does.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def json_strings_only(gbnf: str) -> str:
    """A converted schema's grammar with JSON's strings: no raw control characters."""
    return gbnf.replace(_LOOSE_CHAR, _JSON_CHAR)


def check_grammar(grammar: str) -> None:
    """Refuse a raw GBNF grammar that llama.cpp's recursive parser could not take safely: too long, groups
    nested too deep, or too many rules (rule references are followed recursively too)."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise BadRequest(f"grammar is {len(grammar)} characters; at most {MAX_GRAMMAR_CHARS} are accepted")
    if grammar.count("::=") > MAX_GRAMMAR_RULES:
        raise BadRequest(f"grammar has more than {MAX_GRAMMAR_RULES} rules")
    depth = deepest = 0
    quote = ""  # the closing character of the literal or character class being read
    escaped = comment = False
    for char in grammar:
        if comment:
            comment = char != "\n"
        elif quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char == "#":
            comment = True
        elif char in "\"[":
            quote = "]" if char == "[" else char
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_DEPTH:
        raise BadRequest(f"grammar nests groups {deepest} deep; at most {MAX_GRAMMAR_DEPTH} are accepted")


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) and abs(value) >= 1000 else f"{value:g}"


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop is never emitted, even when it
    arrives split across tokens."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index = min(i for i, _ in hits)
            out, self.pending = self.pending[:index], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
