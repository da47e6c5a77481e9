"""The llama.cpp runner's prompt cache on the real SmolLM2 GGUF: a slot keeps its KV cells after a request and the
next prompt that starts the same reads only the rest, with greedy answers byte-identical to a cold run's (a runner
started with --no-cache-prompt, or `cache_prompt: false`); two conversations on one slot; a shared system prompt;
the least recently used slot dropped under pressure; cached tokens in usage, /health, /api/ps; Ollama's
prompt_eval_count still the whole prompt (as Ollama's own runner counts it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon
from serving import llama_runner

from mgr.daemon.runners.llama.prompt_cache import EXACT_ROWS, common_prefix, exact_chunk

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
