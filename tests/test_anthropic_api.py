"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the real anthropic SDK and raw
HTTP against the real daemon, the real llama.cpp runner and the real SmolLM2 GGUF.

SmolLM2's own template has no tool or thinking syntax: there, only a forced call (tool_choice any or tool)
may use tools (the runner enforces it with a grammar), and thinking is a 400. The copy from
test_runner_templates (a Hermes tool template whose prompt opens a <think> block) can do both. Claude Code's
request, which always carries tools, is replayed against a copy with that tool template and no thinking (as
Qwen2.5-Coder's), under a Claude model name made with `mgr cp`. The tiny vision projector from test_images
pairs with SmolLM2 for the image blocks."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from conftest import QUESTION, Daemon, wait_for
from standin.tiny_vision import N_IMAGE_TOKENS
from test_images import PNG, mmproj, vision_model  # noqa: F401  (fixtures)
from test_runner_templates import TEMPLATE, model_copy  # noqa: F401  (the fixture)

from mgr.daemon.api.render import error_response
from mgr.daemon.errors import QueueFull

pytestmark = pytest.mark.slow

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}}
TIME = {"name": "get_time", "description": "Get the current time in a time zone",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}
SCHEMAS = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
HELLO = [{"role": "user", "content": "Say hello to me."}]
# Sampling fields go in extra_body: the SDK dropped its temperature/top_p/top_k arguments (the API still takes them)
GREEDY = {"temperature": 0}
CLAUDE = "claude-sonnet-4-5-20250929"  # what Claude Code asks for; an alias of the tool/think copy here


@pytest.fixture(scope="module")
def client(daemon: Daemon, smollm2: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def thinker(daemon: Daemon, model_copy: Path) -> str:
    """SmolLM2 with a tool-calling, thinking template."""
    created = daemon.cli("create", "smol-thinker", "--from", str(model_copy))
    assert created.returncode == 0, created.stderr
    return "smol-thinker"


@pytest.fixture(scope="module")
def claude(daemon: Daemon, gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2 with the Hermes tool template and no think block, known by a Claude model's name."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    head, _ = TEMPLATE.split("{%- if add_generation_prompt %}")
    template = head.replace("{{ message.content.split('</think>')[-1] }}", "{{ message.content }}") + \
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    reader = gguf.GGUFReader(gguf_path)
    path = tmp_path_factory.mktemp("tools") / "smollm2-tools.gguf"
    writer = gguf.GGUFWriter(str(path), arch=reader.fields["general.architecture"].contents())
    copy_with_new_metadata(reader, writer, {
        "tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING, template)}, [])
    created = daemon.cli("create", "smol-tools", "--from", str(path))
    assert created.returncode == 0, created.stderr
    copied = daemon.cli("cp", "smol-tools", CLAUDE)
    assert copied.returncode == 0, copied.stderr
    shown = httpx.post(daemon.base_url + "/api/show", json={"model": CLAUDE}, timeout=30).json()
    assert "tools" in shown["capabilities"] and "thinking" not in shown["capabilities"]
    return CLAUDE


def post(daemon: Daemon, body: dict[str, Any], path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(daemon.base_url + path, json=body, timeout=300)


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) for each event of an SSE body; every data line must be JSON naming its event."""
    parsed = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"], block
        parsed.append((fields["event"], data))
    return parsed


def check_order(stream: list[tuple[str, dict[str, Any]]]) -> dict[int, str]:
    """Anthropic's sequence: message_start, then blocks opened, filled and closed one at a time in index order,
    then message_delta and message_stop; pings anywhere after the start. Returns each block's type."""
    names = [name for name, _ in stream if name != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert stream[1][0] == "ping"
    start = stream[0][1]["message"]
    assert start["id"].startswith("msg_") and start["role"] == "assistant" and start["content"] == []
    kinds: dict[int, str] = {}
    open_index: int | None = None
    for name, data in stream[1:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(kinds)
            open_index = data["index"]
            kinds[open_index] = data["content_block"]["type"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
            expected = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}
            assert data["delta"]["type"] == expected[kinds[open_index]]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            assert name == "ping", name
    assert open_index is None
    return kinds


def check_tool_use(block: Any, expected: str | None = None) -> None:
    assert block.type == "tool_use" and block.id and block.name in SCHEMAS
    assert expected is None or block.name == expected
    jsonschema.validate(block.input, SCHEMAS[block.name])


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return str(body["error"]["message"])


# generation -------------------------------------------------------------------------------------------------
def test_create(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="smollm2", max_tokens=16, messages=HELLO, extra_body=GREEDY,
                                     metadata={"user_id": "someone"})
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "smollm2"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text  # type: ignore[union-attr]
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 5 and 0 < message.usage.output_tokens <= 16


def test_stream_events_in_order_and_text_assembled(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="smollm2", max_tokens=12, messages=HELLO, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and final.content[0].text == "".join(pieces)  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12 and final.usage.input_tokens > 5
    whole = client.messages.create(model="smollm2", max_tokens=12, messages=HELLO, extra_body=GREEDY)
    assert whole.content[0].text == "".join(pieces)  # type: ignore[union-attr]  # greedy: the same answer
    raw = [event.type for event in client.messages.create(model="smollm2", max_tokens=12, messages=HELLO,
                                                          extra_body=GREEDY, stream=True)]
    assert raw[:2] == ["message_start", "content_block_start"] and raw[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}


def test_stop_sequences_cut_the_answer(client: anthropic.Anthropic) -> None:
    asked = [{"role": "user", "content": QUESTION}]
    free = client.messages.create(model="smollm2", max_tokens=24, messages=asked, extra_body=GREEDY)
    text = free.content[0].text  # type: ignore[union-attr]
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = client.messages.create(model="smollm2", max_tokens=24, messages=asked, extra_body=GREEDY,
                                 stop_sequences=[stop, "never-written-9"])
    assert cut.content[0].text == text[:text.index(stop)]  # type: ignore[union-attr]
    assert cut.usage.output_tokens < free.usage.output_tokens
    # Which string stopped it comes from the runner's stop_reason (vLLM sends it); the llama.cpp runner does
    # not say yet, and then the turn ends as end_turn.
    assert (cut.stop_reason, cut.stop_sequence) in (("stop_sequence", stop), ("end_turn", None))


def test_system_as_blocks(client: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "You are a pirate.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Answer in one short sentence."}]
    message = client.messages.create(model="smollm2", max_tokens=8, system=system, messages=HELLO)  # type: ignore[arg-type]
    plain = client.messages.create(model="smollm2", max_tokens=8, system="You are a pirate.", messages=HELLO)
    assert message.content and message.usage.input_tokens > plain.usage.input_tokens > 5


def test_forced_tool_call_round_trip(client: anthropic.Anthropic) -> None:
    called = client.messages.create(model="smollm2", max_tokens=80, messages=ASK, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                    tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert called.stop_reason == "tool_use"
    uses = [b for b in called.content if b.type == "tool_use"]
    assert len(uses) == 1
    check_tool_use(uses[0], "get_weather")
    # The result goes back; tool_choice none lets a model without tool syntax answer (it sees the call and its
    # result rendered as text).
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in called.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                             "content": [{"type": "text", "text": "18 degrees and sunny"}]},
                                            {"type": "text", "text": "So, what should I wear?"}]}]
    answer = client.messages.create(model="smollm2", max_tokens=12, messages=history,  # type: ignore[arg-type]
                                    tools=[WEATHER, TIME], tool_choice={"type": "none"})  # type: ignore[list-item]
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text  # type: ignore[union-attr]
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.usage.input_tokens > called.usage.input_tokens  # the call and its result are in the prompt
    failed = client.messages.create(model="smollm2", max_tokens=4, messages=[*history[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "no such city", "is_error": True}]}],  # type: ignore[list-item]
        tools=[WEATHER, TIME], tool_choice={"type": "none"})  # type: ignore[list-item]
    assert failed.content


def test_forced_tool_call_streamed_and_single(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="smollm2", max_tokens=80, messages=ASK, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                extra_body=GREEDY) as stream:
        deltas = [e.delta.partial_json for e in stream
                  if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    check_tool_use(final.content[0])
    assert deltas and json.loads("".join(deltas)) == final.content[0].input  # type: ignore[union-attr]


def test_thinking_blocks_from_a_model_that_reasons(client: anthropic.Anthropic, thinker: str) -> None:
    # adaptive: the model's own way, and this template opens a <think> block, so all it writes is reasoning
    with client.messages.stream(model=thinker, max_tokens=10, messages=HELLO, extra_body=GREEDY,
                                thinking={"type": "adaptive"}) as stream:  # type: ignore[typeddict-item]
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(kinds) == {"thinking_delta"} and [b.type for b in final.content] == ["thinking"]
    assert final.content[0].thinking and final.stop_reason == "max_tokens"  # type: ignore[union-attr]
    whole = client.messages.create(model=thinker, max_tokens=10, messages=HELLO, extra_body=GREEDY,
                                   thinking={"type": "adaptive"})  # type: ignore[typeddict-item]
    assert whole.content == final.content  # greedy: the same reasoning, gathered by the daemon
    hidden = client.messages.create(model=thinker, max_tokens=10, messages=HELLO, extra_body=GREEDY,
                                    thinking={"type": "adaptive", "display": "omitted"})  # type: ignore[typeddict-item]
    assert [(b.type, b.thinking) for b in hidden.content] == [("thinking", "")]  # type: ignore[union-attr]
    assert hidden.usage.output_tokens == final.usage.output_tokens == 10
    # enabled, with Anthropic's smallest budget: leave after the first thinking delta (the runner stops)
    with client.messages.stream(model=thinker, max_tokens=1100, messages=HELLO, extra_body=GREEDY,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        first = next(e for e in stream if e.type == "content_block_delta")
    assert first.delta.type == "thinking_delta"


def test_image_blocks(client: anthropic.Anthropic, vision_model: str) -> None:
    question = "What is in this picture?"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(PNG).decode()}}
    seen = client.messages.create(model=vision_model, max_tokens=6, messages=[  # type: ignore[misc]
        {"role": "user", "content": [{"type": "text", "text": question}, image]}])
    text_only = client.messages.create(model=vision_model, max_tokens=6,
                                       messages=[{"role": "user", "content": question}])
    assert seen.content and seen.usage.input_tokens == text_only.usage.input_tokens + N_IMAGE_TOKENS
    with pytest.raises(anthropic.BadRequestError, match="data: URLs"):  # the llama.cpp runner fetches nothing
        client.messages.create(model=vision_model, max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    with pytest.raises(anthropic.BadRequestError, match="does not support images"):
        client.messages.create(model="smollm2", max_tokens=6, messages=[{"role": "user", "content": [image]}])  # type: ignore[list-item]


# count_tokens -----------------------------------------------------------------------------------------------
def test_count_tokens_is_the_runners_count_of_the_prompt(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="smollm2", messages=HELLO, system="Be brief.")
    generated = client.messages.create(model="smollm2", max_tokens=1, messages=HELLO, system="Be brief.")
    assert counted.input_tokens == generated.usage.input_tokens > 5
    longer = client.messages.count_tokens(model="smollm2", system="Be brief.", messages=[
        {"role": "user", "content": "Say hello to me, and then tell me about the weather in Paris in spring."}])
    assert longer.input_tokens > counted.input_tokens


def test_count_tokens_with_tools_and_thinking(client: anthropic.Anthropic, thinker: str) -> None:
    plain = client.messages.count_tokens(model=thinker, messages=ASK)
    with_tools = client.messages.count_tokens(model=thinker, messages=ASK, tools=[WEATHER])  # type: ignore[list-item]
    assert with_tools.input_tokens > plain.input_tokens + 20  # the template writes the tool's schema
    # this template closes an empty think block when thinking is off, and leaves it open when it is on
    thinking = client.messages.count_tokens(model=thinker, messages=ASK,
                                            thinking={"type": "enabled", "budget_tokens": 2000})
    assert 0 < thinking.input_tokens < plain.input_tokens


# leaving, and a runner that dies ---------------------------------------------------------------------------
STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook."}]


def test_a_stream_the_client_leaves_frees_its_slot(client: anthropic.Anthropic, daemon: Daemon) -> None:
    with client.messages.stream(model="smollm2", max_tokens=2000, messages=STORY) as stream:
        deltas = 0
        for event in stream:
            deltas += event.type == "content_block_delta"
            if deltas == 3:
                break
    assert deltas == 3
    port = next(r.cmdline()[r.cmdline().index("--port") + 1] for r in daemon.runner_processes()
                if "smollm2:latest" in r.cmdline())

    def idle() -> bool:
        models = httpx.get(daemon.base_url + "/api/ps").json()["models"]
        active = [m["active"] for m in models if m["name"] == "smollm2:latest"]
        return active == [0] and httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 0
    assert wait_for(idle, timeout=15)


def test_a_runner_that_dies_mid_stream_ends_it_with_an_error_event(client: anthropic.Anthropic,
                                                                    daemon: Daemon) -> None:
    deltas = 0
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="smollm2", max_tokens=2000, messages=STORY) as stream:
            for event in stream:
                deltas += event.type == "content_block_delta"
                if deltas == 3:
                    for runner in daemon.runner_processes():
                        if "smollm2:latest" in runner.cmdline():
                            os.kill(runner.pid, signal.SIGKILL)
    assert deltas >= 3
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "runner stopped" in caught.value.body["error"]["message"]  # type: ignore[index]


# errors, in Anthropic's shape ---------------------------------------------------------------------------------
def test_thinking_on_a_model_that_cannot_think_is_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="smollm2", max_tokens=2048, messages=HELLO,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert caught.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": '"smollm2" does not support thinking'}}


def test_unknown_model_is_404_not_found(client: anthropic.Anthropic, daemon: Daemon) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such-model" in anthropic_error(post(daemon, {"model": "no-such-model", "messages": HELLO},
                                                   "/v1/messages/count_tokens"), 404, "not_found_error")


def test_auto_tools_on_a_model_without_tool_syntax_is_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="does not support tools"):
        client.messages.create(model="smollm2", max_tokens=4, messages=ASK, tools=[WEATHER])  # type: ignore[list-item]


@pytest.mark.parametrize(("change", "words"), [
    ({"max_tokens": None}, "max_tokens: field required"),
    ({"max_tokens": "ten"}, "max_tokens must be"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "role must be"),
    ({"messages": [{"role": "user", "content": [{"type": "banana"}]}]}, "not 'banana'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "needs text"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, 'with a "type"'),
    ({"messages": [{"role": "user", "content": 7}]}, "content must be"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, "tool_use_id"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]}, "an id"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/bmp", "data": "AAAA"}}]}]}, "media_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "Files API"),
    ({"system": [{"type": "image"}]}, "system[0]"),
    ({"tools": [{"name": "f"}]}, "input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "not among the tools"),
    ({"tool_choice": {"type": "any"}}, "needs tools"),
    ({"tool_choice": "auto"}, "tool_choice must be"),
    ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "at least 1024"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "greater than thinking.budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": "END"}, "stop_sequences"),
])
def test_malformed_requests_are_400(daemon: Daemon, smollm2: str, change: dict[str, Any], words: str) -> None:
    body = {"model": "smollm2", "max_tokens": 8, "messages": HELLO, **change}
    body = {k: v for k, v in body.items() if v is not None}
    assert words in anthropic_error(post(daemon, body), 400, "invalid_request_error")


def test_bad_json_and_count_tokens_errors_are_anthropic_shaped(daemon: Daemon) -> None:
    bad = httpx.post(daemon.base_url + "/v1/messages", content=b"{not json", timeout=30)
    assert "invalid JSON" in anthropic_error(bad, 400, "invalid_request_error")
    counted = post(daemon, {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "x"}]}]},
                   "/v1/messages/count_tokens")
    assert "not 'x'" in anthropic_error(counted, 400, "invalid_request_error")


def test_a_full_queue_is_529_overloaded() -> None:
    response = error_response("POST", "/v1/messages", QueueFull())
    assert response.status_code == 529 and response.headers["retry-after"] == "1"
    assert json.loads(bytes(response.body))["error"]["type"] == "overloaded_error"
    assert error_response("POST", "/v1/chat/completions", QueueFull()).status_code == 503  # other APIs keep 503


# Claude Code's request, replayed ------------------------------------------------------------------------------
CLAUDE_CODE_HEADERS = {
    "x-api-key": "sk-ant-anything", "authorization": "Bearer also-ignored", "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
    "user-agent": "claude-cli/2.0.0 (external, cli)", "x-app": "cli", "content-type": "application/json",
}
BASH = {"name": "Bash", "description": "Executes a given bash command in a persistent shell session.",
        "input_schema": {"type": "object", "properties": {
            "command": {"type": "string", "description": "The command to execute"},
            "timeout": {"type": "number", "description": "Optional timeout in milliseconds (max 600000)"},
            "description": {"type": "string", "description": "Clear, concise description of what this does"}},
            "required": ["command"], "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#"}}
READ = {"name": "Read", "description": "Reads a file from the local filesystem.",
        "input_schema": {"type": "object", "properties": {
            "file_path": {"type": "string", "description": "The absolute path to the file to read"}},
            "required": ["file_path"], "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#"}}


def test_claude_code_request_replayed(daemon: Daemon, claude: str) -> None:
    body = {
        "model": claude,
        "max_tokens": 24,  # Claude Code asks for 32000; a 135M model on two cores gets a short leash
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "\nYou are an interactive CLI tool that helps users with software engineering "
                                     "tasks.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nThis is a reminder.\n</system-reminder>"},
            {"type": "text", "text": "list the files in this folder", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [BASH, READ],
        "metadata": {"user_id": "user_0123abcd_account__session_4567"},
        "temperature": 1,
        "stream": True,
    }
    with httpx.stream("POST", daemon.base_url + "/v1/messages?beta=true", json=body, headers=CLAUDE_CODE_HEADERS,
                      timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        stream = sse_events(response.read().decode())
    kinds = check_order(stream)
    assert stream[0][1]["message"]["model"] == claude
    delta = stream[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    assert delta["usage"]["input_tokens"] > 50 and 0 < delta["usage"]["output_tokens"] <= 24
    assert kinds and set(kinds.values()) <= {"text", "tool_use"}
    for name, data in stream:  # any call the model made is one of the tools, its input the JSON of its deltas
        if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
            assert data["content_block"]["name"] in ("Bash", "Read")
    counted = httpx.post(daemon.base_url + "/v1/messages/count_tokens?beta=true", headers=CLAUDE_CODE_HEADERS,
                         json={k: v for k, v in body.items() if k not in ("max_tokens", "stream", "temperature")},
                         timeout=300)
    assert counted.status_code == 200 and counted.json()["input_tokens"] == delta["usage"]["input_tokens"]
