"""The llama.cpp runner's prompt cache on the real SmolLM2 GGUF: a slot keeps its KV cells after a request and the
next prompt that starts the same reads only the rest, with greedy answers byte-identical to a cold run's (a runner
started with --no-cache-prompt, or `cache_prompt: false`); two conversations on one slot; a shared system prompt;
the least recently used slot dropped under pressure; cached tokens in usage, /health, /api/ps; Ollama's
prompt_eval_count still the whole prompt (as Ollama's own runner counts it)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon
from serving import llama_runner

from mgr.daemon.runners.llama.prompt_cache import EXACT_ROWS, choose_slot, common_prefix, exact_chunk

pytestmark = pytest.mark.slow
CTX = 2048
MAX_TOKENS = 12
# Long enough (well over 2 x EXACT_ROWS tokens) that a conversation's first prompt leaves cells to reuse.
SYSTEMS = {
    name: f"You are {name}, a patient assistant for a small bookshop. " + "Answer in one short sentence. " * 3
    + "The shop opens at nine, closes at six, sells used books, maps and postcards, and has a cat named "
    + f"{cat} who sleeps in the window. Customers often ask about rare atlases, poetry and old travel guides, "
    + "and about the reading club that meets on Thursday evenings in the back room next to the tea corner."
    for name, cat in (("Ada", "Pip"), ("Ben", "Moss"), ("Cleo", "Juniper"))
}
QUESTIONS = ["When do you open?", "Is the cat friendly?", "Do you sell maps?"]
# A question longer than EXACT_ROWS tokens: the whole shared system prompt can then be reused.
LONG_QUESTION = ("My grandmother collected old travel guides from the nineteen fifties, mostly about Italy, Greece "
                 "and the coast of Portugal, and I would like to find one or two more for her birthday next month. "
                 "Do you have any, and could you keep them aside for me until Saturday?")


@pytest.fixture(scope="module")
def cached(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_runner(gguf_path, tmp_path_factory.mktemp("cached") / "runner.log",
                      "--parallel", "1", "--ctx-size", str(CTX)) as url:
        yield url


@pytest.fixture(scope="module")
def cold(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_runner(gguf_path, tmp_path_factory.mktemp("cold") / "runner.log",
                      "--parallel", "1", "--ctx-size", str(CTX), "--no-cache-prompt") as url:
        yield url


def chat(url: str, messages: list[dict[str, str]], **fields: Any) -> tuple[str, dict[str, Any]]:
    response = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["message"]["content"], body["usage"]


def cached_tokens(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def held(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=10).json()["cached_tokens"])


class Conversation:
    """One chat, grown turn by turn with the model's own answers."""

    def __init__(self, system: str) -> None:
        self.messages = [{"role": "system", "content": system}]

    def ask(self, url: str, question: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        self.messages.append({"role": "user", "content": question})
        answer, usage = chat(url, self.messages, **fields)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, usage


def test_a_growing_chat_reads_only_its_new_tokens_and_answers_as_a_cold_run(cached: str, cold: str) -> None:
    warm, reference = Conversation(SYSTEMS["Ada"]), Conversation(SYSTEMS["Ada"])
    previous_prompt = 0
    for turn, question in enumerate(QUESTIONS):
        answer, usage = warm.ask(cached, question)
        cold_answer, cold_usage = reference.ask(cold, question)
        assert answer == cold_answer, f"turn {turn + 1}"
        assert usage["prompt_tokens"] == cold_usage["prompt_tokens"]
        assert cached_tokens(cold_usage) == 0
        if turn == 0:
            assert cached_tokens(usage) == 0
        else:  # the previous prompt, all but the last EXACT_ROWS of this one at most
            assert previous_prompt - EXACT_ROWS <= cached_tokens(usage) <= usage["prompt_tokens"] - EXACT_ROWS
        previous_prompt = usage["prompt_tokens"]
    assert held(cached) == previous_prompt  # the last prompt stays in the slot for the next turn
    assert held(cold) == 0  # --no-cache-prompt: cleared after every request


def test_two_conversations_interleaved_on_one_slot(cached: str, cold: str) -> None:
    a, b = Conversation(SYSTEMS["Ben"]), Conversation(SYSTEMS["Cleo"])
    a_cold, b_cold = Conversation(SYSTEMS["Ben"]), Conversation(SYSTEMS["Cleo"])
    for question in QUESTIONS[:2]:
        for conversation, reference in ((a, a_cold), (b, b_cold)):
            answer, usage = conversation.ask(cached, question)
            assert answer == reference.ask(cold, question)[0]
            # the one slot holds the other conversation: only the template's first tokens are shared
            assert cached_tokens(usage) < 16


def test_a_prompt_sharing_only_the_system_prompt(cached: str, cold: str) -> None:
    first = [{"role": "system", "content": SYSTEMS["Ada"]}, {"role": "user", "content": QUESTIONS[0]}]
    second = [{"role": "system", "content": SYSTEMS["Ada"]}, {"role": "user", "content": LONG_QUESTION}]
    chat(cached, first)
    answer, usage = chat(cached, second)
    assert answer == chat(cold, second)[0]
    system_only = chat(cold, [{"role": "system", "content": SYSTEMS["Ada"]}])[1]["prompt_tokens"]
    # the system prompt's tokens (its rendering ends before the user turn) are read from the cache
    assert system_only - 8 <= cached_tokens(usage) <= system_only + 2


def test_the_same_prompt_again_decodes_only_its_last_part(cached: str) -> None:
    messages = [{"role": "system", "content": SYSTEMS["Ben"]}, {"role": "user", "content": QUESTIONS[2]}]
    answer, usage = chat(cached, messages)
    again, usage_again = chat(cached, messages)
    assert again == answer
    assert cached_tokens(usage_again) == usage["prompt_tokens"] - EXACT_ROWS
    uncached, usage_uncached = chat(cached, messages, cache_prompt=False)  # llama-server's request field
    assert (uncached, cached_tokens(usage_uncached)) == (answer, 0)
    refused = httpx.post(cached + "/v1/chat/completions", timeout=60,
                         json={"messages": messages, "cache_prompt": "yes"})
    assert refused.status_code == 400 and "cache_prompt" in refused.text


def test_a_streamed_answer_counts_its_cached_tokens(cached: str) -> None:
    messages = [{"role": "system", "content": SYSTEMS["Cleo"]}, {"role": "user", "content": QUESTIONS[1]}]
    chat(cached, messages)
    with httpx.stream("POST", cached + "/v1/chat/completions", timeout=300, json={
            "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert cached_tokens(usage) == usage["prompt_tokens"] - EXACT_ROWS > 0


def test_the_least_recently_used_slot_is_dropped(gguf_path: Path, tmp_path: Path) -> None:
    with llama_runner(gguf_path, tmp_path / "runner.log", "--parallel", "2", "--ctx-size", str(CTX)) as url:
        ada, ben, cleo = (Conversation(SYSTEMS[name]) for name in ("Ada", "Ben", "Cleo"))
        first = {name: c.ask(url, QUESTIONS[0])[1]["prompt_tokens"] for name, c in
                 (("ada", ada), ("ben", ben), ("cleo", cleo))}  # Cleo's takes the slot Ada's used (the older)
        assert held(url) == first["ben"] + first["cleo"]
        assert cached_tokens(ben.ask(url, QUESTIONS[1])[1]) >= first["ben"] - EXACT_ROWS  # kept
        assert cached_tokens(ada.ask(url, QUESTIONS[1])[1]) < 16  # dropped: only the template's start is shared
        # Ada's second turn took the least recently used slot (Cleo's), so Cleo's conversation starts over
        assert cached_tokens(cleo.ask(url, QUESTIONS[1])[1]) < 16


def test_exact_chunks_and_common_prefix() -> None:
    assert exact_chunk(100, 512) == 100
    assert exact_chunk(540, 512) == 540 - EXACT_ROWS  # never a last part under EXACT_ROWS
    assert exact_chunk(1200, 512) == 512
    assert exact_chunk(100, 60) == 60  # too short to split well: what fits
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 4
    assert common_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(list(range(1000)), [*range(777), -1]) == 777


def runs(busy: set[int]) -> int:
    """Runs of consecutive ids: the micro-batches llama_decode splits a step into (KV cache not unified)."""
    return sum(1 for s in busy if s - 1 not in busy)


def mean_runs(choose: Callable[[set[int], list[int]], int], clients: int, slots: int = 16) -> float:
    """`clients` closed-loop clients on `slots` sequence slots for 5,000 steps, answers of 100 to 160 tokens (so
    they end in a shifting order): the mean number of runs the generating sequences' ids form per step."""
    rng = random.Random(1)
    free, last_used, clock, left, total = set(range(slots)), [0] * slots, 0, {}, 0
    for _ in range(5000):
        while len(left) < clients:
            seq_id = choose(free, last_used)
            free.discard(seq_id)
            left[seq_id] = rng.randint(100, 160)
        total += runs(set(left))
        for seq_id in list(left):
            left[seq_id] -= 1
            if not left[seq_id]:
                del left[seq_id]
                clock += 1
                last_used[seq_id] = clock
                free.add(seq_id)
    return total / 5000


def test_busy_slots_stay_in_one_run_of_ids() -> None:
    tokens: list[list[int]] = [[] for _ in range(16)]
    ours = {c: mean_runs(lambda free, last: choose_slot(free, last, tokens, [1, 2, 3]), c) for c in (2, 4, 8, 12)}
    least_recent = {c: mean_runs(lambda free, last: min(free, key=lambda s: (last[s], s)), c) for c in (4, 8)}
    assert all(r <= 1.1 for r in ours.values()), ours
    assert least_recent[4] > 2 and least_recent[8] > 3, least_recent  # what LRU alone did: 2.9 and 4.2


def test_a_slot_choice_prefers_a_prefix_then_fewer_runs_then_the_least_recently_used() -> None:
    prompt = list(range(100))
    tokens: list[list[int]] = [[] for _ in range(8)]
    every = set(range(8))
    last_used = [5, 9, 8, 3, 6, 1, 2, 4]  # slot 5 is the least recently used, 1 the most
    assert choose_slot(every - {0, 2}, last_used, tokens, prompt) == 1  # joins the busy 0 and 2 into one run
    assert choose_slot(every - {0, 1}, last_used, tokens, prompt) == 2  # extends the run 0-1
    assert choose_slot(every - {3}, last_used, tokens, prompt) == 4  # 2 and 4 extend 3: the less recently used
    assert choose_slot(every, last_used, tokens, prompt) == 5  # nothing busy: the least recently used
    tokens[6] = prompt[:50]
    assert choose_slot(every - {0, 2}, last_used, tokens, prompt) == 6  # its cells hold half the prompt
    assert choose_slot(every - {0, 2}, last_used, tokens, None) == 1  # an image prompt reuses nothing


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("mgr"), {"MGR_NUM_PARALLEL": "1"})
    d.start()
    yield d
    d.stop()


def test_the_daemon_shows_cached_tokens(daemon: Daemon, smollm2: str) -> None:
    messages = [{"role": "system", "content": SYSTEMS["Ada"]}, {"role": "user", "content": QUESTIONS[0]}]
    first = httpx.post(daemon.base_url + "/api/chat", timeout=300, json={
        "model": smollm2, "messages": messages, "stream": False, "options": {"temperature": 0, "num_predict": 8}})
    assert first.status_code == 200, first.text
    ps = httpx.get(daemon.base_url + "/api/ps", timeout=30).json()["models"]
    assert [m["cached_tokens"] for m in ps] == [first.json()["prompt_eval_count"]]
    again = httpx.post(daemon.base_url + "/v1/chat/completions", timeout=300, json={
        "model": smollm2, "messages": messages, "max_tokens": 8, "temperature": 0}).json()
    # OpenAI's usage: the whole prompt, and how much of it came from the cache (relayed as the runner said it)
    assert again["usage"]["prompt_tokens"] == first.json()["prompt_eval_count"]
    assert cached_tokens(again["usage"]) == again["usage"]["prompt_tokens"] - EXACT_ROWS
    third = httpx.post(daemon.base_url + "/api/chat", timeout=300, json={
        "model": smollm2, "messages": messages, "stream": False, "options": {"temperature": 0, "num_predict": 8}})
    # Ollama's prompt_eval_count is the whole prompt, cached or not (its runner counts cached + processed)
    assert third.json()["prompt_eval_count"] == first.json()["prompt_eval_count"]
    assert third.json()["message"]["content"] == first.json()["message"]["content"]
