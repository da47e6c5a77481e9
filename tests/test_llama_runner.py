"""The llama.cpp runner on the real SmolLM2 GGUF: batching that does not change answers, sampling, stop
strings, grammars, cancellation, truncation and embeddings. Talks to the runner process over HTTP, as the
daemon does."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import QUESTION, wait_for
from serving import llama_runner

from mgr.daemon.protocol.errors import openai_error_body
from mgr.daemon.runners.llama.engine import Engine, EngineConfig, Event, Request
from mgr.daemon.runners.llama.sampling import SamplingParams, StopMatcher
from mgr.daemon.runners.llama.server import RunnerApp, _shorter_conversations

pytestmark = pytest.mark.slow
PARALLEL = 8
CTX = 1024


@pytest.fixture(scope="module")
def runner(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_runner(gguf_path, tmp_path_factory.mktemp("runner") / "runner.log", "--parallel", str(PARALLEL),
                      "--ctx-size", str(CTX), "--served-model-name", "smol") as url:
        yield url


def chat(url: str, content: str, **params: object) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 48, **params}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


PROMPTS = [f"Write two sentences about {thing}." for thing in
           ("cats", "the sea", "a robot", "winter", "bread", "mountains", "a library", "trains")]


def batched_greedy_answers(url: str, **params: object) -> list[str]:
    """The answers to PROMPTS, all sent at once (so the runner decodes them in one batch), greedy."""
    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            responses = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": 48, "temperature": 0, **params,
            }) for p in PROMPTS))
        return [r.json()["choices"][0]["message"]["content"] for r in responses]

    return asyncio.run(together())


def test_batched_greedy_answers_equal_answers_alone(runner: str) -> None:
    alone = [chat(runner, p, temperature=0)["choices"][0]["message"]["content"] for p in PROMPTS]
    batched = batched_greedy_answers(runner)
    assert len(set(alone)) == len(PROMPTS)  # eight different answers...
    assert batched == alone  # ...each byte-identical to the same prompt decoded alone


def test_seeded_sampling_reproduces(runner: str) -> None:
    params = {"temperature": 1.0, "top_k": 40, "top_p": 0.95, "max_tokens": 32}
    first = chat(runner, "Tell me a story.", seed=42, **params)["choices"][0]["message"]["content"]
    again = chat(runner, "Tell me a story.", seed=42, **params)["choices"][0]["message"]["content"]
    other = [chat(runner, "Tell me a story.", seed=s, **params)["choices"][0]["message"]["content"] for s in (7, 8)]
    assert first == again
    assert any(o != first for o in other)


def test_stop_strings_are_not_emitted(runner: str) -> None:
    full = chat(runner, QUESTION, temperature=0)["choices"][0]["message"]["content"]
    assert full == "The capital of France is Paris."
    # "France is" spans two tokens ("France", " is"): held back until it is known, then cut
    cut = chat(runner, QUESTION, temperature=0, stop=["France is"])
    assert cut["choices"][0]["message"]["content"] == "The capital of "
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = httpx.post(runner + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "stop": ["Paris"], "stream": True})
    pieces = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in pieces if c["choices"])
    assert text == "The capital of France is " and "Par" not in text


def test_stop_matcher_holds_back_partial_matches() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("abc</") == ("abc", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d> tail") == ("", True)
    matcher = StopMatcher(["xyz"])
    assert matcher.feed("ax") == ("a", False)
    assert matcher.feed("b") == ("xb", False)
    assert matcher.flush() == ""


def test_max_tokens_and_ignore_eos(runner: str) -> None:
    answer = chat(runner, QUESTION, temperature=0, max_tokens=30, ignore_eos=True)
    assert answer["usage"]["completion_tokens"] == 30 and answer["choices"][0]["finish_reason"] == "length"
    short = chat(runner, QUESTION, temperature=0, max_tokens=3)
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"


def test_the_engines_own_argmax_answers_as_llama_cpps_greedy_sampler(runner: str) -> None:
    """Plain greedy requests take the argmax in the engine (Engine._pick); a zero logit_bias changes no logit
    but sends the same request through llama.cpp's sampler chain: every token must be the same, with
    ignore_eos's ban on end tokens too, one request at a time and batched."""
    neutral = {"logit_bias": {"0": 0}}
    assert not SamplingParams.from_request({"temperature": 0, **neutral}).plain_greedy
    assert SamplingParams.from_request({"temperature": 0, "ignore_eos": True}).plain_greedy
    for extra in ({}, {"ignore_eos": True, "max_tokens": 64}):
        own = [chat(runner, p, temperature=0, **extra)["choices"][0]["message"]["content"] for p in PROMPTS[:4]]
        chained = [chat(runner, p, temperature=0, **neutral, **extra)["choices"][0]["message"]["content"]
                   for p in PROMPTS[:4]]
        assert len(set(own)) == 4 and own == chained, (extra, own, chained)
    assert batched_greedy_answers(runner) == batched_greedy_answers(runner, **neutral)


def test_logit_bias_bans_a_token(runner: str, gguf_path: Path) -> None:
    import gguf

    vocab = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.tokens"].contents()
    paris = vocab.index("\u0120Paris")  # GPT-2 byte-level BPE writes a leading space as U+0120
    body = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    first = httpx.post(runner + "/v1/completions", timeout=60, json=body).json()["choices"][0]["text"]
    assert first == " Paris"
    banned = httpx.post(runner + "/v1/completions", timeout=60,
                        json={**body, "logit_bias": {str(paris): -100}}).json()["choices"][0]["text"]
    assert banned != " Paris"
    bad = httpx.post(runner + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": "y"}})
    assert bad.status_code == 400


def test_json_schema_output_parses_and_validates(runner: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"]}
    answer = chat(runner, "Give the capital of France and its population as JSON.", temperature=0, max_tokens=80,
                  response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    value = json.loads(answer["choices"][0]["message"]["content"])
    assert isinstance(value["city"], str) and isinstance(value["population"], int)
    # JSON strings hold no raw control characters: llama-cpp-python's converter allowed them, and this question
    # ran on past the string's end ('{ "city" : "Paris }\n\nPronounced...'), which did not parse
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = chat(runner, QUESTION, temperature=0, max_tokens=60,
                  response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": city}})
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"])["city"], str)
    anything = chat(runner, "List three colors.", temperature=0, max_tokens=80,
                    response_format={"type": "json_object"})
    assert isinstance(json.loads(anything["choices"][0]["message"]["content"]), (dict, list))


def test_cancelled_request_frees_its_slot(runner: str) -> None:
    """Fill all 8 slots with long generations, drop one client: a 9th request gets the slot and finishes
    while the other seven are still generating."""

    async def scenario() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=300) as client:
            async def long(i: int) -> float:
                response = await client.post(runner + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": 400,
                    "ignore_eos": True, "temperature": 0})
                assert response.status_code == 200
                return time.monotonic()

            others = [asyncio.create_task(long(i)) for i in range(1, PARALLEL)]
            async with client.stream("POST", runner + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400, "ignore_eos": True,
                "stream": True}) as stream:
                lines = stream.aiter_lines()
                for _ in range(5):
                    await anext(lines)
            # the stream is closed: its slot must be free at the next step
            ninth = await client.post(runner + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 10, "temperature": 0})
            ninth_done = time.monotonic()
            assert ninth.status_code == 200 and ninth.json()["usage"]["completion_tokens"] > 0
            return ninth_done, min(await asyncio.gather(*others))

    ninth_done, first_other_done = asyncio.run(scenario())
    assert ninth_done < first_other_done
    assert wait_for(lambda: httpx.get(runner + "/health").json()["active"] == 0, timeout=30)


def test_prompt_longer_than_context(runner: str) -> None:
    long_text = "The quick brown fox jumps over the lazy dog. " * 150  # ~1500 tokens > CTX
    refused = httpx.post(runner + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": long_text + QUESTION}], "max_tokens": 8})
    assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    for _ in range(6):
        history += [{"role": "user", "content": long_text[:900]}, {"role": "assistant", "content": "Noted."}]
    history.append({"role": "user", "content": QUESTION})
    truncated = httpx.post(runner + "/v1/chat/completions", timeout=60, json={
        "messages": history, "max_tokens": 20, "temperature": 0, "truncate": True})
    assert truncated.status_code == 200, truncated.text
    assert truncated.json()["usage"]["prompt_tokens"] < CTX
    assert "Paris" in truncated.json()["choices"][0]["message"]["content"]


def test_truncation_keeps_system_and_last_message() -> None:
    messages = [{"role": "system", "content": "S"}] + [{"role": "user", "content": str(i)} for i in range(4)]
    shorter = list(_shorter_conversations(messages, True))
    assert [[m["content"] for m in c] for c in shorter] == [["S", "1", "2", "3"], ["S", "2", "3"], ["S", "3"]]
    assert list(_shorter_conversations(messages, False)) == []


def test_error_mid_stream_ends_the_stream_with_an_openai_error() -> None:
    """An engine failure after the first token (llama_decode failing) ends the SSE stream with the protocol's
    error body and no [DONE]."""
    app = RunnerApp(Engine(EngineConfig(model_path="unused.gguf")), "smol")  # never started: no model loads

    async def stream() -> list[bytes]:
        request = Request(asyncio.get_running_loop(), SamplingParams(), "prompt", add_special=True)
        request.emit(Event("text", text="Hi"))
        request.emit(Event("error", text="llama_decode failed with code 1"))
        return [event async for event in app._stream(request, "chatcmpl-1", 0, chat=True, include_usage=False)]

    events = [json.loads(e.removeprefix(b"data: ")) for e in asyncio.run(stream())]
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert events[2:] == [openai_error_body("llama_decode failed with code 1", 500)]


def test_embeddings_shape_determinism_and_batching(runner: str) -> None:
    texts = ["The cat sat on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    one = httpx.post(runner + "/v1/embeddings", json={"input": texts}, timeout=60).json()
    again = httpx.post(runner + "/v1/embeddings", json={"input": texts}, timeout=60).json()
    alone = [httpx.post(runner + "/v1/embeddings", json={"input": t}, timeout=60).json()["data"][0]["embedding"]
             for t in texts]
    vectors = [d["embedding"] for d in one["data"]]
    assert [len(v) for v in vectors] == [576] * 3  # SmolLM2-135M's embedding width
    assert vectors == [d["embedding"] for d in again["data"]]
    assert all(math.isclose(a, b, abs_tol=1e-4) for v, w in zip(vectors, alone, strict=True)
               for a, b in zip(v, w, strict=True))
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert one["usage"]["prompt_tokens"] > 10
    bad = httpx.post(runner + "/v1/embeddings", json={"input": 5}, timeout=60)
    assert bad.status_code == 400


# tools, logprobs, n, echo, dimensions (issue 11) ---------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}, "hour24": {"type": "boolean"}},
                   "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def sse_events(url: str, path: str, body: dict) -> list[dict]:
    response = httpx.post(url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                          timeout=300)
    assert response.status_code == 200, response.text
    lines = response.text.splitlines()
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def streamed_calls(events: list[dict]) -> tuple[dict[int, dict[str, str]], str | None, str]:
    """OpenAI's way of putting streamed tool calls together: by index; and the finish reason and content."""
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for event in events:
        for choice in event["choices"]:
            finish = choice["finish_reason"] or finish
            content += choice["delta"].get("content") or ""
            for delta in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.get("id", "")
                call["name"] += delta.get("function", {}).get("name", "")
                call["arguments"] += delta.get("function", {}).get("arguments", "")
    return calls, finish, content


def check_call(name: str, arguments: str, expected: str | None) -> None:
    import jsonschema

    assert name in SCHEMAS and (expected is None or name == expected)
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("choice", [NAMED, "required"], ids=["named", "required"])
def test_forced_call_parses_and_matches_its_schema(runner: str, choice: object) -> None:
    """SmolLM2's template has no tool syntax: only the grammar makes this 135M model call, whole and streamed."""
    expected = "get_weather" if choice == NAMED else None
    body = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice, "temperature": 0, "max_tokens": 150}
    whole = httpx.post(runner + "/v1/chat/completions", json=body, timeout=300).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    calls = whole["message"]["tool_calls"]
    assert len(calls) >= 1 and (choice != NAMED or len(calls) == 1)
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        check_call(call["function"]["name"], call["function"]["arguments"], expected)
    streamed, finish, content = streamed_calls(sse_events(runner, "/v1/chat/completions", body))
    assert finish == "tool_calls" and content == "" and len(streamed) == len(calls)
    for index, call in streamed.items():
        check_call(call["name"], call["arguments"], expected)
        assert call["name"] == calls[index]["function"]["name"]
        assert json.loads(call["arguments"]) == json.loads(calls[index]["function"]["arguments"])
    # and with sampling, several times: always a call that matches
    for seed in range(3):
        answer = chat(runner, ASK[0]["content"], tools=[WEATHER, TIME], tool_choice=choice, temperature=1.2,
                      seed=seed, max_tokens=150, parallel_tool_calls=False)["choices"][0]
        assert answer["finish_reason"] == "tool_calls" and len(answer["message"]["tool_calls"]) == 1
        call = answer["message"]["tool_calls"][0]["function"]
        check_call(call["name"], call["arguments"], expected)


def test_tool_choice_none_renders_no_tools_and_parses_nothing(runner: str) -> None:
    plain = chat(runner, ASK[0]["content"], temperature=0, max_tokens=20)["choices"][0]
    none = chat(runner, ASK[0]["content"], tools=[WEATHER], tool_choice="none", temperature=0,
                max_tokens=20)["choices"][0]
    assert none == plain and none["message"]["content"]  # the same prompt: the same answer


def test_tool_results_round_trip(runner: str) -> None:
    """The assistant's call (arguments as a JSON string, as OpenAI sends them) and the tool's result, with
    tool_call_id (OpenAI) or tool_name (Ollama), render and get an answer."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    for result in ({"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
                   {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 21}'}):
        body = {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}, result],
                "temperature": 0, "max_tokens": 30, "tools": [WEATHER]}
        response = httpx.post(runner + "/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]


def test_bad_tool_requests_are_400s_in_the_protocol_shape(runner: str) -> None:
    for fields in ({"tools": [WEATHER], "tool_choice": "sometimes"},
                   {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                   {"tool_choice": "required"}, {"tools": [{"type": "function"}]},
                   {"logprobs": True, "top_logprobs": 21}, {"n": 0}):
        response = httpx.post(runner + "/v1/chat/completions", timeout=60,
                              json={"messages": ASK, "max_tokens": 2, **fields})
        assert response.status_code == 400, fields
        assert response.json() == openai_error_body(response.json()["error"]["message"], 400)


def check_logprobs(entries: list[dict], content: str, top_n: int) -> None:
    assert "".join(e["token"] for e in entries) == content
    for entry in entries:
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode() == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == top_n
        assert top[0]["token"] == entry["token"] and math.isclose(top[0]["logprob"], entry["logprob"])  # greedy
        assert all(a["logprob"] >= b["logprob"] for a, b in zip(top, top[1:], strict=False))


def test_chat_logprobs_at_temperature_zero(runner: str) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 12,
            "logprobs": True, "top_logprobs": 3}
    whole = httpx.post(runner + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    content = whole["message"]["content"]
    assert content.startswith("The capital of France is Paris")
    check_logprobs(whole["logprobs"]["content"], content, 3)
    events = sse_events(runner, "/v1/chat/completions", body)
    chunks = [c for e in events for c in e["choices"] if c.get("logprobs")]
    streamed = [entry for c in chunks for entry in c["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]
    assert all("".join(e["token"] for e in c["logprobs"]["content"]) == c["delta"]["content"] for c in chunks)
    plain = chat(runner, QUESTION, temperature=0, max_tokens=12)["choices"][0]
    assert plain["message"]["content"] == content and "logprobs" not in plain  # the plain path: none


def test_completion_logprobs_and_echo(runner: str) -> None:
    prompt = "The capital of France is"
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 4, "logprobs": 2, "echo": True}
    choice = httpx.post(runner + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"].startswith(prompt + " Paris")
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"][len(prompt):]
    assert logprobs["text_offset"][0] == len(prompt)
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                   strict=True):
        assert logprob <= 0 and max(top.values()) == logprob and top[token] == logprob and len(top) <= 3
    events = sse_events(runner, "/v1/completions", body)
    texts = [c["text"] for e in events for c in e["choices"]]
    assert texts[0] == prompt and "".join(texts) == choice["text"]


def test_n_choices(runner: str) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 1.0, "seed": 5,
            "max_tokens": 16, "n": 2}
    answer = httpx.post(runner + "/v1/chat/completions", json=body, timeout=60).json()
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]  # two samples, not one twice
    assert answer["usage"]["completion_tokens"] == 32 or all(c["finish_reason"] for c in choices)
    events = sse_events(runner, "/v1/chat/completions", body)
    texts = {0: "", 1: ""}
    finished = set()
    for event in events:
        for c in event["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == {0, 1} and texts == {i: c["message"]["content"] for i, c in enumerate(choices)}
    assert events[-1]["usage"] == answer["usage"]
    completions = httpx.post(runner + "/v1/completions", timeout=60, json={
        "prompt": "Once upon a time", "max_tokens": 8, "n": 3, "seed": 1}).json()["choices"]
    assert [c["index"] for c in completions] == [0, 1, 2]


def test_embedding_dimensions(runner: str) -> None:
    full = httpx.post(runner + "/v1/embeddings", json={"input": "The cat sat."}, timeout=60).json()["data"][0]
    cut = httpx.post(runner + "/v1/embeddings", json={"input": "The cat sat.", "dimensions": 64},
                     timeout=60).json()["data"][0]["embedding"]
    assert len(cut) == 64 and math.isclose(sum(v * v for v in cut), 1.0, rel_tol=1e-6)
    norm = math.sqrt(sum(v * v for v in full["embedding"][:64]))
    assert all(math.isclose(a, b / norm, abs_tol=1e-6) for a, b in zip(cut, full["embedding"][:64], strict=True))
    for bad in (0, 577, "64"):
        response = httpx.post(runner + "/v1/embeddings", json={"input": "x", "dimensions": bad}, timeout=60)
        assert response.status_code == 400 and "dimensions" in response.json()["error"]["message"]


def test_suffix_needs_fim_tokens(runner: str) -> None:
    response = httpx.post(runner + "/v1/completions", json={"prompt": "def f(", "suffix": "\n", "max_tokens": 4},
                          timeout=60)
    assert response.status_code == 400 and "fill-in-the-middle" in response.json()["error"]["message"]


def test_leaving_a_rich_stream_frees_every_choice(runner: str) -> None:
    """Two choices with logprobs, streamed; the client leaves after a few chunks: both sequences stop."""
    with httpx.stream("POST", runner + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 400, "ignore_eos": True,
            "n": 2, "logprobs": True, "stream": True}) as stream:
        lines = stream.iter_lines()
        for _ in range(6):
            next(lines)
    assert wait_for(lambda: httpx.get(runner + "/health").json()["active"] == 0, timeout=10)
