"""OpenAI's Responses API (/v1/responses) through the real openai client against the real daemon and the real
llama.cpp runner on SmolLM2: string and item input, instructions, a forced function call and its output sent
back, streaming in OpenAI's event order, previous_response_id over stored responses (also after a restart),
store false, GET / DELETE / input_items, structured output, and the errors in OpenAI's shape. Codex CLI cannot
run here: its documented request shape is replayed through httpx, on a SmolLM2 copy whose template thinks and
calls tools (test_runner_templates), with a grammar steering the 135M model to write what such a model writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import QUESTION, Daemon
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from test_runner_templates import model_copy  # noqa: F401  (the fixture)

from mgr.daemon.responses_store import ResponseNotFound, ResponseStore

pytestmark = pytest.mark.slow

WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": WEATHER_SCHEMA, "strict": True}
ASK = "What is the weather like in Paris today?"
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)  # the client's own types, validated (its parser is lenient)


@pytest.fixture(scope="module")
def client(daemon: Daemon, smollm2: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of a Responses stream, each valid as the openai client types it; each `event:` name must
    match its data's type."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            assert event["type"] == name
            EVENT.validate_python(event)
            events.append(event)
    return events


def check_order(types: list[str]) -> None:
    """OpenAI's order: created, in_progress, then per item added ... done, then one terminal event."""
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    body = types[2:-1]
    open_item = False
    for kind in body:
        if kind == "response.output_item.added":
            assert not open_item
            open_item = True
        elif kind == "response.output_item.done":
            assert open_item
            open_item = False
        else:
            assert open_item, f"{kind} outside an output item"
    assert not open_item


# answers ----------------------------------------------------------------------------------------------------
def test_string_input(client: openai.OpenAI) -> None:
    response = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=24, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == "smollm2:latest"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert "Paris" in response.output_text
    usage = response.usage
    assert usage is not None and usage.input_tokens > 10 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="smollm2", input="Write a long story about a dragon.",
                                       max_output_tokens=4, temperature=0)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage and response.usage.output_tokens == 4


def test_items_with_instructions(client: openai.OpenAI) -> None:
    """Message items of every role and part kind; the instructions reach the prompt (more prompt tokens)."""
    items: Any = [
        {"role": "developer", "content": "Keep answers short."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": QUESTION},
    ]
    plain = client.responses.create(model="smollm2", input=items, max_output_tokens=16, temperature=0)
    instructed = client.responses.create(model="smollm2", input=items, max_output_tokens=16, temperature=0,
                                         instructions="You are a geography teacher.")
    assert instructed.instructions == "You are a geography teacher." and instructed.output_text
    assert plain.usage and instructed.usage and instructed.usage.input_tokens > plain.usage.input_tokens
    stored = list(client.responses.input_items.list(instructed.id, order="asc"))
    assert [(i.type, getattr(i, "role", None)) for i in stored] == [
        ("message", "developer"), ("message", "user"), ("message", "assistant"), ("message", "user")]
    assert all(i.id for i in stored) and stored[3].content[0].text == QUESTION  # type: ignore[union-attr]


def test_structured_output(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon"]}},
              "required": ["capital"], "additionalProperties": False}
    response = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=40, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                                        "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text and response.text.format.type == "json_schema"


# tools ------------------------------------------------------------------------------------------------------
def test_forced_function_call_then_its_output(client: openai.OpenAI) -> None:
    """A call forced with tool_choice comes back as a function_call item; sending its output back, explicitly
    or through previous_response_id, gets an answer from the same prompt."""
    first = client.responses.create(model="smollm2", input=ASK, tools=[WEATHER], max_output_tokens=80,
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id and call.id and call.id != call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21, "sky": "sunny"}'}
    explicit = client.responses.create(
        model="smollm2", input=[{"role": "user", "content": ASK}, call.model_dump(exclude_none=True), result],
        tools=[WEATHER], tool_choice="none", max_output_tokens=24, temperature=0)
    assert explicit.output[0].type == "message" and explicit.output_text
    continued = client.responses.create(model="smollm2", previous_response_id=first.id, input=[result],
                                        tools=[WEATHER], tool_choice="none", max_output_tokens=24, temperature=0)
    assert continued.previous_response_id == first.id
    assert explicit.usage and continued.usage and first.usage
    assert continued.usage.input_tokens == explicit.usage.input_tokens > first.usage.input_tokens
    assert continued.output_text == explicit.output_text
    listed = client.responses.input_items.with_raw_response.list(continued.id, order="asc").http_response.json()
    ResponseItemList.model_validate(listed)  # the items as the client types them, ids included
    assert [i["type"] for i in listed["data"]] == ["message", "function_call", "function_call_output"]
    assert listed["data"][1] == call.model_dump(exclude_none=True) and listed["has_more"] is False


def test_required_call_streams_its_arguments(daemon: Daemon, client: openai.OpenAI) -> None:
    with httpx.stream("POST", daemon.base_url + "/v1/responses", timeout=120, json={
            "model": "smollm2", "input": ASK, "tools": [WEATHER], "tool_choice": "required", "stream": True,
            "parallel_tool_calls": False, "max_output_tokens": 80, "temperature": 0}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    types = [e["type"] for e in events]
    check_order(types)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = next(e["item"] for e in events if e["type"] == "response.output_item.added")
    assert added["type"] == "function_call" and added["status"] == "in_progress" and added["name"] == "get_weather"
    pieces = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert pieces == done["arguments"] and done["item_id"] == added["id"]
    jsonschema.validate(json.loads(pieces), WEATHER_SCHEMA)
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["arguments"] == pieces
    assert final["output"][0]["call_id"] == added["call_id"]


def test_a_function_tool_on_a_model_without_tools_is_told(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match='"smollm2" does not support tools'):
        client.responses.create(model="smollm2", input=ASK, tools=[WEATHER], max_output_tokens=8)


# streaming --------------------------------------------------------------------------------------------------
def test_stream_through_the_client(client: openai.OpenAI) -> None:
    deltas: list[str] = []
    types: list[str] = []
    with client.responses.stream(model="smollm2", input=QUESTION, max_output_tokens=40, temperature=0) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    check_order(types)
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text and "Paris" in final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text  # a streamed one is stored too


def test_a_runner_that_dies_mid_answer_fails_the_response(daemon: Daemon, client: openai.OpenAI) -> None:
    """After the 200, a runner failure is response.failed (error code server_error); nothing is stored."""
    with httpx.stream("POST", daemon.base_url + "/v1/responses", timeout=120, json={
            "model": "smollm2", "input": "Write a very long story about a dragon.", "stream": True,
            "max_output_tokens": 2000}) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "response.output_text.delta":
                break
        [runner] = daemon.runner_processes()
        runner.kill()
        last = [json.loads(line[6:]) for line in lines if line.startswith("data: ")][-1]
    assert last["type"] == "response.failed"
    EVENT.validate_python(last)
    assert last["response"]["status"] == "failed" and last["response"]["error"]["code"] == "server_error"
    assert last["response"]["output"] == []  # the message item never finished
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(last["response"]["id"])
    assert client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=4).output_text  # a new runner


# stored responses -------------------------------------------------------------------------------------------
def test_previous_response_id_continues_the_stored_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="smollm2", input="My name is Alice.", max_output_tokens=16, temperature=0)
    second = client.responses.create(model="smollm2", previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=16, temperature=0)
    assert first.usage and second.usage
    # the prompt holds the first turn (its input and its answer) before the new question
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    seen = [item.id for item in client.responses.input_items.list(second.id, order="asc")]
    assert seen[1] == first.output[0].id and len(seen) == 3
    third = client.responses.create(model="smollm2", previous_response_id=second.id, input="And again?",
                                    max_output_tokens=8, temperature=0)
    assert len(list(client.responses.input_items.list(third.id))) == 5


def test_get_and_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=16, temperature=0,
                                       metadata={"purpose": "test"})
    stored = client.responses.retrieve(response.id)
    assert stored.model_dump() == response.model_dump() and stored.metadata == {"purpose": "test"}
    raw = client.responses.with_raw_response.retrieve(response.id).http_response.json()
    Response.model_validate(raw)  # every field the client's type requires, of its type
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=8, store=False)
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError, match="Previous response with id"):
        client.responses.create(model="smollm2", input="Go on.", previous_response_id=response.id)


# errors -----------------------------------------------------------------------------------------------------
def test_reasoning_on_a_model_that_cannot_think(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match='"smollm2" does not support thinking'):
        client.responses.create(model="smollm2", input=QUESTION, reasoning={"effort": "low"})
    off = client.responses.create(model="smollm2", input=QUESTION, reasoning={"effort": "none"}, max_output_tokens=8)
    assert off.output_text and off.reasoning and off.reasoning.effort == "none"


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="no-such-model", input=QUESTION)
    assert caught.value.code == "model_not_found"


def test_an_image_for_a_model_without_vision(client: openai.OpenAI) -> None:
    pixel = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
             "AAAABJRU5ErkJggg==")
    with pytest.raises(openai.BadRequestError, match="does not support images"):
        client.responses.create(model="smollm2", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": pixel}]}])


@pytest.mark.parametrize(("body", "words"), [
    ({"model": "smollm2"}, "missing field 'input'"),
    ({"model": "smollm2", "input": 42}, "input must be a string"),
    ({"model": "smollm2", "input": [{"type": "bogus"}]}, "items of type 'bogus'"),
    ({"model": "smollm2", "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"model": "smollm2", "input": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "input[0].content[0]"),
    ({"model": "smollm2", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "smollm2", "input": "hi", "tools": [{"type": "web_search"}]}, "function tools only"),
    ({"model": "smollm2", "input": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "needs a name"),
    ({"model": "smollm2", "input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}},
     "not among the tools"),
    ({"model": "smollm2", "input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"model": "smollm2", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "smollm2", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "smollm2", "input": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "smollm2", "input": "hi", "metadata": {"k": 1}}, "metadata"),
    ({"model": "smollm2", "input": "hi", "background": True}, "background"),
])
def test_malformed_requests_are_400s_in_openai_shape(daemon: Daemon, smollm2: str, body: dict[str, Any],
                                                     words: str) -> None:
    response = httpx.post(daemon.base_url + "/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]


def test_unknown_ids_are_404s_in_openai_shape(daemon: Daemon, smollm2: str) -> None:
    for method, path, body in (("GET", "/v1/responses/resp_unknown", None),
                               ("DELETE", "/v1/responses/resp_unknown", None),
                               ("GET", "/v1/responses/resp_unknown/input_items", None),
                               ("GET", "/v1/responses/not-an-id", None),
                               ("POST", "/v1/responses", {"model": "smollm2", "input": "hi",
                                                          "previous_response_id": "resp_unknown"})):
        response = httpx.request(method, daemon.base_url + path, json=body, timeout=30)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["type"] == "not_found_error"


# Codex CLI --------------------------------------------------------------------------------------------------
def test_codex_request_shape_streams(daemon: Daemon, smollm2: str, model_copy: Path) -> None:
    """Codex's request (codex-rs ResponsesApiRequest): instructions, message items (developer and user,
    content as input_text parts), flat function tools with strict false, tool_choice auto, parallel_tool_calls,
    reasoning {effort, summary}, store false, stream true, include ["reasoning.encrypted_content"],
    prompt_cache_key; then its next turn, stateless: the reasoning, the call and its output sent back.
    `grammar` and `logit_bias` (not Codex's) make the 135M model write reasoning, text and a call."""
    from test_runner_templates import BIAS, THOUGHT, literal

    assert daemon.cli("create", "smol-tools", "--from", str(model_copy)).returncode == 0
    shell = {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
             "strict": False, "parameters": {"type": "object", "properties": {
                 "command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"],
                 "additionalProperties": False}}
    call = '{"name": "shell", "arguments": {"command": ["ls"]}}'
    grammar = (f'root ::= {literal(THOUGHT)} {literal("</think>")} {literal(chr(10) * 2 + "Let me look.")} '
               f'{literal("<tool_call>")} {literal(chr(10) + call + chr(10))} {literal("</tool_call>")}')
    history: list[dict[str, Any]] = [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "<permissions>...</permissions>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context>cwd: /repo"
                                                                                      "</environment_context>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
    ]
    codex = {"model": "smol-tools", "instructions": "You are Codex, a coding agent.", "tools": [shell],
             "tool_choice": "auto", "parallel_tool_calls": False, "reasoning": {"effort": "medium", "summary": "auto"},
             "store": False, "stream": True, "include": ["reasoning.encrypted_content"],
             "prompt_cache_key": "0199-session"}
    headers = {"Authorization": "Bearer unused", "OpenAI-Beta": "responses=experimental", "session_id": "0199"}
    with httpx.stream("POST", daemon.base_url + "/v1/responses", headers=headers, timeout=180, json={
            **codex, "input": history, "grammar": grammar, "logit_bias": BIAS, "max_output_tokens": 120}) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response)
    types = [e["type"] for e in events]
    check_order(types)
    assert types[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "response.reasoning_text.delta" in types and "response.reasoning_summary_text.delta" in types
    items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    reasoning, message, function_call = items
    assert reasoning["content"][0]["text"] == reasoning["summary"][0]["text"] == THOUGHT
    assert reasoning["encrypted_content"] == THOUGHT
    assert message["content"][0]["text"] == "Let me look."
    assert function_call["name"] == "shell" and json.loads(function_call["arguments"]) == {"command": ["ls"]}
    final = first_turn = events[-1]["response"]
    assert final["output"] == items and final["store"] is False and final["usage"]["output_tokens"] > 0
    assert httpx.get(f"{daemon.base_url}/v1/responses/{final['id']}").status_code == 404  # store false

    # the next turn: Codex sends the whole history back, with the items it got and the call's output
    answer = "The folder holds README.md."
    history += [reasoning, message, function_call,
                {"type": "function_call_output", "call_id": function_call["call_id"], "output": "README.md\n"}]
    with httpx.stream("POST", daemon.base_url + "/v1/responses", headers=headers, timeout=180, json={
            **codex, "input": history, "grammar": f'root ::= {literal("Done.")} {literal("</think>")} '
                                                  f'{literal(chr(10) * 2 + answer)}',
            "logit_bias": BIAS, "max_output_tokens": 60}) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response)
    final = events[-1]["response"]
    assert final["status"] == "completed" and [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][1]["content"][0]["text"] == answer
    assert final["usage"]["input_tokens"] > first_turn["usage"]["input_tokens"]  # the history grew


# the store --------------------------------------------------------------------------------------------------
def test_store_is_bounded_oldest_first_and_keeps_its_order(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path, max_responses=3)
    ids = [f"resp_{i:04d}" for i in range(5)]
    for ident in ids:
        store.put(ident, {"response": {"id": ident}, "input_items": []})
    assert store.ids() == ids[2:]
    with pytest.raises(ResponseNotFound):
        store.get(ids[0])
    reopened = ResponseStore(tmp_path, max_responses=3)  # as after a restart: the same order
    assert reopened.ids() == ids[2:] and reopened.get(ids[4])["response"]["id"] == ids[4]
    reopened.put("resp_0005", {"response": {"id": "resp_0005"}, "input_items": []})
    assert reopened.ids() == [*ids[3:], "resp_0005"]
    reopened.delete(ids[3])
    assert len(list(tmp_path.iterdir())) == 2
    small = ResponseStore(tmp_path / "small", max_bytes=100)
    for ident in ids:
        small.put(ident, {"response": {"id": ident}, "input_items": ["x" * 30]})
    assert small.ids() == ids[-1:]  # each is over half the cap; the newest always stays


def test_stored_responses_survive_a_restart(daemon: Daemon, client: openai.OpenAI) -> None:
    first = client.responses.create(model="smollm2", input="My name is Alice.", max_output_tokens=8, temperature=0)
    daemon.stop()
    daemon.start()
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model="smollm2", previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=8, temperature=0)
    assert second.usage and first.usage and second.usage.input_tokens > first.usage.input_tokens
