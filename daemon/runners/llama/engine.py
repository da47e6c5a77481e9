"""Continuous batching over llama.cpp's low-level API.

One dedicated thread makes every llama call, the load included: ggml keeps one OpenMP thread team per calling
OS thread, and several teams on few cores turn every barrier into a futex sleep (a 4x slowdown measured here).

Each step builds one batch holding the next token of every generating sequence plus chunks of prompts still
being read, within n_batch tokens (more in one decode aborts the process), and runs one llama_decode. A new
request takes a free sequence slot at the next step: the one whose KV cells hold the longest prefix of its prompt,
which it does not decode again (prompt_cache.py); a finished or cancelled one keeps its cells for a later prompt.
The KV cache is not unified: every sequence has its own n_ctx / n_parallel cells, so an answer never depends on
what else shares the batch.

The asyncio side talks to the thread through a SimpleQueue (requests in) and an Outbox (events out): the events
of one step reach the event loop in one call_soon_threadsafe, not one per token of every sequence (each is a
write to the loop's wake-up pipe and a wake-up; at 16 sequences that was 16 of each per step). A request's
`cancelled` flag is read at every step.

A request that asks for logprobs, or for control tokens rendered as text (a tool-call parser's markers), is
sampled by `_sample_rich`; every other one by `_sample`, which does nothing more per token than it needs.
Logprobs are llama-server's n_probs: the log-softmax of the model's raw logits at the sampled position (before
logit bias, penalties, grammar and temperature), the chosen token's and the top N.

Images (a vision model's mmproj, loaded as a libmtmd context after the model): a request with images is prefilled
whole and at once when it takes its slot (`_start_media`), on this thread, between two batch steps: its bitmaps
decoded from the image bytes, its prompt (the media marker where each image goes) tokenized by mtmd_tokenize into
text and image chunks, and the chunks evaluated into the slot's own sequence by mtmd_helper_eval_chunks (text in
token batches, each image encoded by the projector and its embeddings decoded in a batch of their own). Its first
token is sampled at once from the last decode's logits; then it generates in the ordinary batched steps like any
other sequence. Other sequences wait for that prefill (one step's delay); plain requests take no new path.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal, NoReturn, TypedDict

import llama_cpp as llama
import numpy as np

from ...protocol.shapes import FinishReason
from . import faults
from .embeddings import Embedder, put_token
from .lora import apply_lora
from .prompt_cache import EXACT_ROWS, SlotCache, exact_chunk
from .reasoning import CLOSE, OPEN
from .sampling import BadRequest, SamplingParams, StopMatcher
from .tool_calls import MARKERS
from .vision import Vision
from .vocabulary import Vocabulary

log = logging.getLogger("mgr.runner")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model_path: str
    n_parallel: int = 4
    n_ctx_per_seq: int = 4096
    n_batch: int = 512
    n_threads: int = 2
    n_gpu_layers: int = -1  # -1 = all layers when the build can offload
    mmproj: str | None = None  # a vision model's projector: images are accepted when it is set
    chat_template: str | None = None  # a Jinja chat template given at create, used instead of the model's
    lora: str | None = None  # a GGUF LoRA adapter given at create, applied to every sequence
    cache_prompt: bool = True  # slots keep their KV cells for later prompts (prompt_cache.py)


# What output parsers look for: rendered as text for the requests they read, even where they are control tokens.
OUTPUT_MARKERS = (OPEN, CLOSE, *(marker for markers in MARKERS.values() for marker in markers))
EventKind = Literal["started", "text", "done", "error", "embeddings"]
# One generated token's logprobs: its bytes, its logprob, and the top alternatives' (bytes, logprob), best first.
LogprobEntry = tuple[bytes, float, list[tuple[bytes, float]]]


class EventUsage(TypedDict, total=False):
    """What a "done" event counts (tokens, and the engine's clock in ms) or an "embeddings" event carries."""

    prompt_tokens: int
    completion_tokens: int
    prompt_ms: float
    predicted_ms: float
    data: list[list[float]]  # the vectors, one per input
    truncated: int  # "started": prompt tokens dropped to fit the context (oldest messages first)
    prompt_token_ids: list[int]  # "done": the prompt as the model read it
    token_ids: list[int]  # "done": the tokens generated, the end-of-generation token included (as vLLM's)
    cached_tokens: int  # "done": the prompt's first tokens found in the slot's cache, not decoded again


@dataclasses.dataclass
class Event:
    kind: EventKind
    text: str = ""  # "text": the piece; "error": the message
    finish_reason: FinishReason | None = None  # "done"
    status: int = 500  # "error": the HTTP status to answer with
    usage: EventUsage | None = None
    logprobs: list[LogprobEntry] | None = None  # "text", when asked: the tokens that made it (and earlier held ones)


class Outbox:
    """Events the engine thread emitted since its last `flush`, handed to their event loops together."""

    def __init__(self) -> None:
        self._held: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event], Event]] = []

    def put(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event], event: Event) -> None:
        self._held.append((loop, events, event))

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        for loop, events, event in held:
            by_loop.setdefault(loop, []).append((events, event))
        for loop, deliveries in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop already closed (its server stopped) takes nothing
                loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for events, event in deliveries:
        events.put_nowait(event)


class Submission:
    """What the asyncio side hands the engine thread: events come back on `events`, through the loop (by the
    engine's Outbox once submitted)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False  # set by the asyncio side; read by the engine at every step
        self.fault: faults.Fault | None = None  # the test hook (faults.py): where this request makes the engine fail
        self.outbox: Outbox | None = None  # set by Engine.submit

    def emit(self, event: Event) -> None:
        if self.outbox is not None:
            self.outbox.put(self.loop, self.events, event)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client has gone (asyncio side): the engine drops the request at its next step, and whoever awaits
        its next event is answered now (one still waiting for a sequence slot would otherwise wait on)."""
        self.cancelled = True
        self.events.put_nowait(Event("error", text="the client has gone", status=499))


class Request(Submission):
    """One generation. Built on the asyncio side; the engine thread owns everything after `submit`.

    `shorter` yields (when the client allows truncation) shorter renderings of the same conversation, oldest
    messages dropped first; the engine renders them only when `prompt` does not fit, and takes the first
    that does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, params: SamplingParams, prompt: str | list[int],
                 add_special: bool, shorter: Iterator[str] = iter(()), *, top_logprobs: int | None = None,
                 specials: frozenset[int] = frozenset(), images: tuple[bytes, ...] = ()) -> None:
        super().__init__(loop)
        self.params = params
        self.prompt = prompt  # text, or token ids read as they are (OpenAI's token prompts)
        self.shorter = shorter
        self.add_special = add_special
        self.top_logprobs = top_logprobs  # None: no logprobs; N: the chosen token's and the top N
        self.specials = specials  # control tokens rendered as their text (others render as nothing)
        self.images = images  # image file bytes, one per media marker in `prompt`, in order
        self.truncated = 0  # tokens the handler already dropped to fit (truncation.py); `prompt` is then token ids


class EmbedRequest(Submission):
    """Texts to embed; answered with one "embeddings" event (vectors in `usage["data"]`) or an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inputs: list[str], truncate: bool) -> None:
        super().__init__(loop)
        self.inputs = inputs
        self.truncate = truncate


class _Slot:
    """Engine-thread state of one sequence."""

    def __init__(self, seq_id: int, request: Request, tokens: list[int], chain: Any,
                 sample: Callable[[_Slot], None]) -> None:
        self.seq_id = seq_id
        self.request = request
        self.prompt = tokens
        self.n_prompt = len(tokens)  # what usage counts (an image prompt's, its text and image tokens)
        self.n_prompt_done = 0  # prompt tokens already decoded
        self.n_past = 0  # tokens in this sequence's KV cache
        self.n_cached = 0  # prompt tokens its slot held already (the prompt cache)
        self.n_exact = 0  # first prompt tokens whose KV cells a cold run would compute the same (prompt_cache.py)
        self.last_token = -1
        self.n_generated = 0
        self.generated: list[int] = []  # for return_token_ids and Ollama's context
        self.chain = chain
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(request.params.stop)
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.truncated = 0  # prompt tokens dropped to fit, told with "started" (at the first token)
        self.logit_index = -1
        self.pending: list[LogprobEntry] = []  # logprobs of tokens whose text is still held back
        self.sample = sample  # the engine's _sample, or _sample_rich for logprobs and rendered control tokens
        self.greedy = request.params.plain_greedy  # the argmax read by the engine, not the chain (Engine._pick)

    @property
    def prefilling(self) -> bool:
        return self.n_prompt_done < len(self.prompt)


class Engine:
    # Set by _load on the engine thread. llama.cpp's handles are ctypes pointers, untyped.
    model: Any
    vocab: Any
    ctx: Any
    memory: Any
    batch: Any
    n_vocab: int
    n_batch: int
    add_bos: bool
    eog_tokens: frozenset[int]  # the end-of-generation tokens
    _logit_row: type[ctypes.Array[ctypes.c_float]]  # one output's logits, over llama.cpp's memory
    tokenize: Callable[[str, bool], list[int]]  # these three are the Vocabulary's; tokenize works on any thread
    _piece: Callable[[int], bytes]
    _piece_special: Callable[[int], bytes]
    _cache: SlotCache  # the sequence slots: which are free, what their KV cells hold

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.n_ctx_seq = 0
        self.chat_template: str | None = None
        self.bos_text = ""
        self.eos_text = ""
        self.n_embd = 0
        self.fim: tuple[str, str, str] | None = None  # the FIM prefix, suffix and middle tokens' texts
        self.controls: dict[str, int] = {}  # output markers that are control tokens in this vocabulary
        self._inbox: queue.SimpleQueue[Request | EmbedRequest] = queue.SimpleQueue()
        self._outbox = Outbox()  # flushed before the engine waits or decodes: every event leaves within a step
        self._waiting: deque[Request] = deque()  # admitted, waiting for a free sequence slot
        self._embedder: Embedder | None = None
        self.vision: Vision | None = None  # a vision model's projector
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self.active = 0  # sequences in a slot; read by /health for visibility only

    @property
    def cached_tokens(self) -> int:
        """Tokens idle slots hold in their KV cells for later prompts (the prompt cache); read by /health."""
        return self._cache.held if self.ready.is_set() and not self.load_error else 0

    # asyncio side ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request | EmbedRequest) -> None:
        request.outbox = self._outbox
        self._inbox.put(request)

    @property
    def waiting(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    # engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
        except Exception as e:
            self.load_error = str(e)
            log.error("load failed: %s", e)
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop()
        except BaseException as e:
            faults.engine_cannot_go_on(e)  # the process ends here: the daemon starts a new runner
        finally:
            self._free()

    def _load(self) -> None:
        cfg = self.config
        self.model, on_gpu = _load_model(cfg)
        words = Vocabulary(self.model, OUTPUT_MARKERS)
        self.vocab, self.n_vocab, self.tokenize, self._piece = words.vocab, words.n_vocab, words.tokenize, words.piece
        self._piece_special, self.bos_text, self.eos_text = words.piece_special, words.bos_text, words.eos_text
        self.add_bos, self.fim, self.controls = words.add_bos, words.fim, words.controls
        self.eog_tokens = frozenset(words.eog_tokens)
        self._logit_row = ctypes.c_float * self.n_vocab
        self.ctx = _new_context(self.model, cfg)
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_ctx_seq = llama.llama_n_ctx_seq(self.ctx)
        self.n_batch = min(cfg.n_batch, llama.llama_n_batch(self.ctx))
        self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        template = llama.llama_model_chat_template(self.model, None)
        self.chat_template = cfg.chat_template or (template.decode("utf-8", errors="replace") if template else None)
        self.n_embd = llama.llama_model_n_embd(self.model)
        if cfg.mmproj:
            self.vision = Vision(cfg.mmproj, self.model, use_gpu=on_gpu, n_threads=cfg.n_threads)
        self._cache = SlotCache(self.memory, cfg.n_parallel, cfg.cache_prompt)
        self._slots: list[_Slot] = []
        log.info("loaded %s: %d sequences x %d tokens, batch %d, %d threads",
                 cfg.model_path, cfg.n_parallel, self.n_ctx_seq, self.n_batch, cfg.n_threads)

    def _free(self) -> None:
        if self._embedder is not None:
            self._embedder.free()
        for slot in self._slots:
            llama.llama_sampler_free(slot.chain)
        if self.vision is not None:
            self.vision.free()  # it refers to the model: freed before it
            self.vision = None
        llama.llama_batch_free(self.batch)
        llama.llama_free(self.ctx)
        llama.llama_model_free(self.model)

    def _admit(self, block: bool) -> None:
        """Drain the inbox: embeddings are answered at once, generations take free slots in arrival order."""
        while True:
            try:
                request = self._inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if isinstance(request, EmbedRequest):
                self._begin(request)
            else:
                self._waiting.append(request)
        while self._cache and self._waiting:
            request = self._waiting.popleft()
            if not request.cancelled:
                self._begin(request)

    def _begin(self, request: Request | EmbedRequest) -> None:
        """Start a generation (or answer an embedding); its failure is its own error, the engine goes on."""
        if request.fault == "engine":  # raised outside any request's guard, as an engine bug would be
            raise faults.InjectedFault("injected into the engine loop (test hook)")
        try:
            if request.fault == "start":
                raise faults.InjectedFault("injected while starting a request (test hook)")
            if isinstance(request, EmbedRequest):
                self._embed(request)
                return
            self._start(request)
            if request.fault == "sample" and self._slots and (slot := self._slots[-1]).request is request:
                slot.sample = faults.failing_after_first(slot.sample)
        except Exception as e:
            self._failed(request, e)

    def _failed(self, request: Submission, error: Exception) -> None:
        """A request's own failure: its error is answered, and what it held (its sequence) given back."""
        status, message = faults.request_error(error)
        request.emit(Event("error", text=message, status=status))
        for slot in [s for s in self._slots if s.request is request]:
            self._release(slot)
        self._cache.reclaim({s.seq_id for s in self._slots})  # a slot taken, not yet occupied, when it failed

    def _embed(self, request: EmbedRequest) -> None:
        if request.cancelled:
            return
        if self._embedder is None:
            self._embedder = Embedder(self.model, self.config.n_ctx_per_seq, self.config.n_threads, self.tokenize)
        vectors, n_tokens = self._embedder.embed(request.inputs, request.truncate)  # a failure: _failed answers it
        request.emit(Event("embeddings", usage={"data": vectors, "prompt_tokens": n_tokens}))

    def _prompt_tokens(self, request: Request, text: str) -> list[int]:
        return self.tokenize(text, self._add_special(request, text))

    def _add_special(self, request: Request, text: str) -> bool:
        """Whether tokenizing adds BOS: not when the rendered template wrote it already."""
        bos_written = bool(self.bos_text) and text.startswith(self.bos_text)
        return request.add_special and self.add_bos and not bos_written

    def _start(self, request: Request) -> None:
        """Take a slot; a prompt that cannot be read raises (BadRequest: 400), and _begin answers it."""
        if request.images:
            self._start_media(request)
            return
        tokens = _given_tokens(request.prompt, self.n_vocab) if isinstance(request.prompt, list) \
            else self._prompt_tokens(request, request.prompt)
        n_full = len(tokens) + request.truncated
        while len(tokens) >= self.n_ctx_seq:  # no room to generate: try shorter renderings, if allowed
            tokens = self._prompt_tokens(request, next(request.shorter, None) or _too_long(n_full, self.n_ctx_seq))
        if not tokens:
            raise BadRequest("the prompt is empty")
        chain = request.params.build_chain(self.vocab, self.n_vocab, self.eog_tokens)
        if len(tokens) < n_full:  # never silent: the runner's answer says so in a header, and the log
            log.info("prompt truncated to fit the context of %d: %d of %d tokens dropped (oldest messages)",
                     self.n_ctx_seq, n_full - len(tokens), n_full)
        seq_id, cached = self._cache.take(tokens, request.params.cache_prompt)
        slot = _Slot(seq_id, request, tokens, chain, self._sampler(request))
        slot.n_cached = slot.n_exact = slot.n_prompt_done = slot.n_past = cached  # the rest is decoded
        self._occupy(slot, n_full - len(tokens))

    def _sampler(self, request: Request) -> Callable[[_Slot], None]:
        return self._sample_rich if request.top_logprobs is not None or request.specials else self._sample

    def _occupy(self, slot: _Slot, truncated: int = 0) -> None:
        self._slots.append(slot)
        self.active = len(self._slots)
        slot.truncated = truncated

    def _first_token(self, slot: _Slot) -> None:
        """The "started" event goes out with the first token: an answer begins once its prompt is read, so that
        the daemon's first-byte timeout covers the queue and the prompt, and its idle timeout only the tokens."""
        slot.t_first = time.perf_counter()
        slot.request.emit(Event("started", usage={"truncated": slot.truncated} if slot.truncated else None))

    def _start_media(self, request: Request) -> None:
        """Admit a request with images: its whole prompt evaluated now into its sequence (vision.py), its
        first token sampled; a prompt that cannot be read (an image that does not decode, a marker without its
        image, no room in the context) is a 400, and the slot is given back."""
        if self.vision is None:
            raise BadRequest("the model does not support images")
        if not isinstance(request.prompt, str):
            raise BadRequest("images need the prompt as text, not token ids")
        chain = request.params.build_chain(self.vocab, self.n_vocab, self.eog_tokens)
        seq_id, _ = self._cache.take(None)  # image embeddings are never reused: a cleared slot
        t_start = time.perf_counter()
        try:
            add_special = self._add_special(request, request.prompt)
            n_tokens, n_past = self.vision.prefill(request.prompt, add_special, request.images, self.ctx, seq_id,
                                                   self.n_ctx_seq, self.n_batch)
        except (BadRequest, RuntimeError) as e:
            llama.llama_sampler_free(chain)
            self._cache.give_back(seq_id, None)
            request.emit(Event("error", text=str(e), status=400 if isinstance(e, BadRequest) else 500))
            return
        slot = _Slot(seq_id, request, [], chain, self._sampler(request))
        slot.t_start, slot.n_prompt, slot.n_past = t_start, n_tokens, n_past
        self._occupy(slot)
        slot.logit_index = -1  # the last decode's last output: the prompt's last token
        slot.sample(slot)

    def _finish(self, slot: _Slot, reason: FinishReason, flush: bool = False) -> None:
        """End a sequence with a "done" event. `flush` emits text still held back (end of generation or
        length); a stop string drops it."""
        if flush:
            text, stopped = slot.stops.feed(slot.decoder.decode(b"", final=True))
            text += "" if stopped else slot.stops.flush()
            if text or slot.pending:
                slot.request.emit(Event("text", text=text, logprobs=slot.pending or None))
        now = time.perf_counter()
        t_first = slot.t_first or now
        slot.request.emit(Event("done", finish_reason=reason, usage={
            "prompt_tokens": slot.n_prompt,
            "completion_tokens": slot.n_generated,
            "prompt_ms": (t_first - slot.t_start) * 1000,
            "predicted_ms": (now - t_first) * 1000,
            "prompt_token_ids": slot.prompt,
            "token_ids": slot.generated,
            "cached_tokens": slot.n_cached,
        }))
        self._release(slot)

    def _release(self, slot: _Slot, keep: bool = True) -> None:
        """Give a sequence's slot back (its sampler chain, its id), its KV cells kept for a later prompt unless
        `keep` is false (a failed decode) or they hold images; on its own, for a cancelled or failed sequence,
        it tells the request nothing."""
        llama.llama_sampler_free(slot.chain)
        self._slots.remove(slot)
        # only the prompt's exact prefix is offered again; the cells past it are dropped when the slot is taken
        self._cache.give_back(slot.seq_id, slot.prompt[:slot.n_exact] if keep and not slot.request.images else None)
        self.active = len(self._slots)

    def _loop(self) -> NoReturn:
        batch = self.batch
        outbox = self._outbox
        while True:
            idle = not self._slots and not self._waiting
            if idle:
                outbox.flush()  # before waiting for work
            self._admit(block=idle)
            for slot in [s for s in self._slots if s.request.cancelled]:
                self._release(slot)
            if not self._slots:
                continue
            # Prompt chunks share what n_batch leaves after one token per generating sequence; the oldest
            # request gets it first.
            batch.n_tokens = _fill(batch, self._slots, self.n_batch)
            # The last step's events leave just before the decode, which releases the GIL: the event loop wakes
            # to them while the decode runs. Woken earlier, it took the GIL from this thread's Python between
            # two steps (measured here: 69 us a step at 1 sequence, the step's whole gap being 263 us).
            outbox.flush()
            rc = llama.llama_decode(self.ctx, batch)
            if rc != 0:
                for slot in list(self._slots):
                    slot.request.emit(Event("error", text=f"llama_decode failed with code {rc}"))
                    self._release(slot, keep=False)
                continue
            for slot in list(self._slots):
                if slot.logit_index >= 0:
                    try:
                        slot.sample(slot)
                    except Exception as e:  # that sequence's failure, not the engine's
                        self._failed(slot.request, e)

    def _pick(self, slot: _Slot) -> int:
        """The next token. Greedy without anything else to apply, it is the first highest logit, read here:
        numpy's argmax takes ~4 us where llama_sampler_sample takes ~175 us (measured here, SmolLM2's 49,152
        tokens), since llama.cpp copies every logit into a candidate array before its greedy sampler looks.
        Both pick the lowest id among equal logits, so answers do not change."""
        if slot.greedy:
            logits = llama.llama_get_logits_ith(self.ctx, slot.logit_index)
            row = np.frombuffer(memoryview(self._logit_row.from_address(ctypes.addressof(logits.contents))),
                                dtype=np.float32)
            token = int(row.argmax())
            if token not in self.eog_tokens or not slot.request.params.ignore_eos:
                return token
        return int(llama.llama_sampler_sample(slot.chain, self.ctx, slot.logit_index))

    def _sample(self, slot: _Slot) -> None:
        token = self._pick(slot)
        if slot.t_first is None:
            self._first_token(slot)
        slot.generated.append(token)
        if token in self.eog_tokens:
            self._finish(slot, "stop", flush=True)
            return
        slot.n_generated += 1
        slot.last_token = token
        text, stopped = slot.stops.feed(slot.decoder.decode(self._piece(token)))
        if text:
            slot.request.emit(Event("text", text=text))
        if stopped:
            self._finish(slot, "stop")
        elif (slot.request.params.max_tokens is not None and slot.n_generated >= slot.request.params.max_tokens
              or slot.n_past + 1 >= self.n_ctx_seq):
            self._finish(slot, "length", flush=True)

    def _sample_rich(self, slot: _Slot) -> None:
        """`_sample`, with logprobs and control tokens rendered, as the request asked."""
        token: int = llama.llama_sampler_sample(slot.chain, self.ctx, slot.logit_index)
        if slot.t_first is None:
            self._first_token(slot)
        slot.generated.append(token)
        if token in self.eog_tokens:
            self._finish(slot, "stop", flush=True)
            return
        slot.n_generated += 1
        slot.last_token = token
        request = slot.request
        piece = self._piece_special(token) if token in request.specials else self._piece(token)
        text, stopped = slot.stops.feed(slot.decoder.decode(piece))
        if request.top_logprobs is not None:
            logits = llama.llama_get_logits_ith(self.ctx, slot.logit_index)
            slot.pending.append(_logprobs(logits, self.n_vocab, token, request.top_logprobs, self._piece_special))
        if stopped:
            slot.pending = _through(slot.pending, len(text))
        if text or stopped and slot.pending:
            request.emit(Event("text", text=text, logprobs=slot.pending or None))
            slot.pending = []
        if stopped:
            self._finish(slot, "stop")
        elif (request.params.max_tokens is not None and slot.n_generated >= request.params.max_tokens
              or slot.n_past + 1 >= self.n_ctx_seq):
            self._finish(slot, "length", flush=True)


def _fill(batch: Any, slots: list[_Slot], n_batch: int) -> int:
    """Write one step's batch: the next token of every generating sequence, and prompt chunks in what n_batch
    leaves (the oldest request's first); the number of tokens written."""
    generating = sum(1 for slot in slots if not slot.prefilling)
    budget = n_batch - generating
    chunk: dict[int, int] = {}
    for slot in slots:
        if slot.prefilling and budget > 0:
            chunk[slot.seq_id] = exact_chunk(len(slot.prompt) - slot.n_prompt_done, budget)
            budget -= chunk[slot.seq_id]
    alone = generating == 0 and len(chunk) == 1  # one sequence's prompt rows, as a cold run decodes them
    # Written in ascending seq_id order: llama.cpp decoded an out-of-order batch ~35% slower (measured
    # here: 41 ms vs 30 ms for the same 8 tokens).
    n = 0
    for slot in sorted(slots, key=lambda s: s.seq_id):
        slot.logit_index = -1
        if not slot.prefilling:
            put_token(batch, n, slot.last_token, slot.n_past, slot.seq_id, True)
            slot.logit_index = n
            slot.n_past += 1
            n += 1
            continue
        take = chunk.get(slot.seq_id, 0)
        if alone and take >= EXACT_ROWS and slot.n_exact == slot.n_prompt_done:
            slot.n_exact += take
        for i in range(take):
            last = slot.n_prompt_done + i == len(slot.prompt) - 1
            put_token(batch, n, slot.prompt[slot.n_prompt_done + i], slot.n_past, slot.seq_id, last)
            if last:
                slot.logit_index = n
            slot.n_past += 1
            n += 1
        slot.n_prompt_done += take
    return n


def _given_tokens(tokens: list[int], n_vocab: int) -> list[int]:
    """A prompt sent as token ids: each must be in the vocabulary (llama_decode aborts the process on one that
    is not)."""
    bad = next((t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab), None)
    if bad is not None:
        raise BadRequest(f"the prompt's token id {bad!r} is not in this model's vocabulary (0 to {n_vocab - 1})")
    return tokens


def _too_long(n_tokens: int, n_ctx_seq: int) -> NoReturn:
    raise BadRequest(f"the prompt has {n_tokens} tokens, more than this model's context of {n_ctx_seq} "
                     "(raise num_ctx, shorten the prompt, or allow truncation)")


def _load_model(cfg: EngineConfig) -> tuple[Any, bool]:
    """The model, and whether its layers went to a GPU."""
    llama.llama_backend_init()
    model_params = llama.llama_model_default_params()
    # Offload when the build can and the daemon assigned a GPU (placement is CUDA_VISIBLE_DEVICES).
    gpu_assigned = os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
    if llama.llama_supports_gpu_offload() and gpu_assigned:
        model_params.n_gpu_layers = 999 if cfg.n_gpu_layers < 0 else cfg.n_gpu_layers
    else:
        model_params.n_gpu_layers = 0
    model = llama.llama_model_load_from_file(cfg.model_path.encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {cfg.model_path} (see the lines above)")
    return model, model_params.n_gpu_layers > 0


def _new_context(model: Any, cfg: EngineConfig) -> Any:
    """n_parallel sequences of n_ctx_per_seq tokens (at most what the model was trained for), each its own,
    with the model's LoRA adapter when it has one."""
    train_ctx = llama.llama_model_n_ctx_train(model)
    per_seq = min(cfg.n_ctx_per_seq, train_ctx) if train_ctx > 0 else cfg.n_ctx_per_seq
    ctx_params = llama.llama_context_default_params()
    ctx_params.n_seq_max = cfg.n_parallel
    ctx_params.n_ctx = per_seq * cfg.n_parallel
    ctx_params.n_batch = cfg.n_batch
    ctx_params.n_ubatch = cfg.n_batch
    ctx_params.n_threads = cfg.n_threads
    ctx_params.n_threads_batch = cfg.n_threads
    ctx_params.kv_unified = False  # an answer must not depend on its batch neighbours
    ctx_params.no_perf = True
    ctx = llama.llama_init_from_model(model, ctx_params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context (not enough memory for the KV cache?)")
    if cfg.lora:
        apply_lora(model, ctx, cfg.lora)
    return ctx


def _logprobs(pointer: Any, n_vocab: int, token: int, top_n: int, piece: Callable[[int], bytes]) -> LogprobEntry:
    """The log-softmax of the raw logits (`pointer`: llama.cpp's row for the sampled position): the chosen
    token's, and the top N (ties in the order greedy sampling breaks them: lower token id first)."""
    logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,))
    top = logits.max()
    log_total = float(top) + math.log(float(np.exp(logits - top).sum(dtype=np.float64)))
    alternatives: list[tuple[bytes, float]] = []
    if top_n > 0:
        # the best are near the top: look there first (a full argpartition of the vocabulary costs ~0.4 ms)
        margin = 2.0
        while len(best := np.flatnonzero(logits >= top - margin)) < top_n and margin < 1e30:
            margin *= 4
        if len(best) > 4 * top_n + 64:
            best = best[np.argpartition(logits[best], -top_n)[-top_n:]]
        best = best[np.lexsort((best, -logits[best]))][:top_n]
        alternatives = [(piece(int(t)), float(logits[t]) - log_total) for t in best]
    return piece(token), float(logits[token]) - log_total, alternatives


def _through(entries: list[LogprobEntry], n_chars: int) -> list[LogprobEntry]:
    """The entries of the tokens that made the first `n_chars` characters (a stop string cut the rest)."""
    kept, length = [], 0
    for entry in entries:
        if length >= n_chars:
            break
        kept.append(entry)
        length += len(entry[0].decode("utf-8", errors="replace"))
    return kept
