"""Tool calls through the daemon with the real clients (ollama, openai, LangChain) against the real llama.cpp
runner on SmolLM2. SmolLM2's template has no tool syntax, so only a forced call (tool_choice "required" or a
named function) may use tools: the runner enforces it with a grammar from the tools' JSON schemas, so even this
135M model answers a call that parses and matches its schema. The Ollama API takes tool_choice too (mgr goes
past Ollama, which ignores it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest
from conftest import Daemon
from test_runner_templates import model_copy  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(daemon: Daemon, smollm2: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused")


def check_call(name: str, arguments: dict[str, Any], expected: str | None = None) -> None:
    assert name in SCHEMAS and (expected is None or name == expected)
    jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_openai_forced_call_whole(client: openai.OpenAI, choice: Any) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                            tool_choice=choice, temperature=0, max_tokens=120)
    choice0 = answer.choices[0]
    assert choice0.finish_reason == "tool_calls"
    calls = choice0.message.tool_calls or []
    assert len(calls) >= 1 and all(c.id and c.type == "function" for c in calls)
    for call in calls:
        check_call(call.function.name, json.loads(call.function.arguments), "get_weather" if choice == NAMED else None)


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_openai_forced_call_streamed(client: openai.OpenAI, choice: Any) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice=choice, temperature=0, max_tokens=120, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for delta in c.delta.tool_calls or []:
                slot = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function is not None:
                    slot["name"] += delta.function.name or ""
                    slot["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and calls
    for call in calls.values():
        check_call(call["name"], json.loads(call["arguments"]), "get_weather" if choice == NAMED else None)


def test_openai_single_call_when_parallel_calls_are_off(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                            tool_choice="required", parallel_tool_calls=False, temperature=0,
                                            max_tokens=120)
    assert len(answer.choices[0].message.tool_calls or []) == 1


def test_tool_choice_none_answers_in_prose(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=20)
    assert not answer.choices[0].message.tool_calls and answer.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_forced_call_has_object_arguments(daemon: Daemon, smollm2: str, stream: bool) -> None:
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": NAMED, "stream": stream,
            "options": {"temperature": 0, "num_predict": 120}}
    with httpx.stream("POST", daemon.base_url + "/api/chat", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    calls = [c for line in lines for c in line.get("message", {}).get("tool_calls", [])]
    assert len(calls) == 1 and lines[-1]["done"]
    assert isinstance(calls[0]["function"]["arguments"], dict)  # Ollama's arguments are an object
    check_call(calls[0]["function"]["name"], calls[0]["function"]["arguments"], "get_weather")


def test_ollama_client_round_trip_with_a_tool_result(daemon: Daemon, smollm2: str) -> None:
    """A forced call, then the tool's result sent back (role tool, tool_name): the model answers in prose."""
    client = ollama.Client(host=daemon.base_url)
    first = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        "model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": NAMED, "stream": False,
        "options": {"temperature": 0, "num_predict": 120}}).json()
    call = first["message"]["tool_calls"][0]
    answer = client.chat("smollm2", messages=[
        *ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 21, "sky": "sunny"}'},
    ], options={"temperature": 0, "num_predict": 30})
    assert answer.message.content and not answer.message.tool_calls


def test_openai_round_trip_with_a_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                           temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    answer = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=30, messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ])
    assert answer.choices[0].message.content


def test_langchain_agent_gets_a_structured_call(daemon: Daemon, smollm2: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Get the current weather in a city, in celsius or fahrenheit."""
        return f"21 {unit} in {city}"

    model = ChatOpenAI(model="smollm2", base_url=daemon.base_url + "/v1", api_key="unused", temperature=0,
                       max_tokens=120)
    message = model.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather like in Paris today?")
    assert len(message.tool_calls) >= 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert isinstance(get_weather.invoke(call["args"]), str)  # the agent can run what the model asked for


def test_langchain_ollama_is_told_the_model_has_no_tools(daemon: Daemon, smollm2: str) -> None:
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    model = ChatOllama(model="smollm2", base_url=daemon.base_url, temperature=0)
    with pytest.raises(ollama.ResponseError, match='"smollm2" does not support tools'):
        model.bind_tools([get_weather]).invoke("What is the weather like in Paris today?")


def test_a_template_with_tool_syntax_answers_auto_calls_through_the_clients(
        daemon: Daemon, smollm2: str, model_copy: Path) -> None:
    """A model whose template has tool syntax (a SmolLM2 copy with a Hermes/think template, from
    test_runner_templates) gets `tools` capability, and an `auto` call in its own syntax comes back parsed to the
    openai client and to LangChain. The runner's raw `grammar` field (passed through by the daemon) and a logit
    bias make the 135M model write what a real tool model writes; the parsing is what is tested."""
    from langchain_openai import ChatOpenAI
    from test_runner_templates import ASK as TOOL_ASK
    from test_runner_templates import BIAS, THOUGHT, literal
    from test_runner_templates import WEATHER as TOOL_WEATHER

    assert daemon.cli("create", "smol-tools", "--from", str(model_copy)).returncode == 0
    shown = httpx.post(daemon.base_url + "/api/show", json={"model": "smol-tools"}).json()
    assert {"tools", "thinking"} <= set(shown["capabilities"])
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    grammar = (f'root ::= {literal(THOUGHT)} {literal("</think>")} {literal(chr(10) * 2 + "Let me check.")} '
               f'{literal("<tool_call>")} {literal(chr(10) + call + chr(10))} {literal("</tool_call>")}')
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused")
    answer = client.chat.completions.create(model="smol-tools", messages=TOOL_ASK, tools=[TOOL_WEATHER],
                                            logit_bias=BIAS, max_tokens=120, extra_body={"grammar": grammar})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert choice.message.model_extra and choice.message.model_extra.get("reasoning_content") == THOUGHT
    [tool_call] = choice.message.tool_calls or []
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    model = ChatOpenAI(model="smol-tools", base_url=daemon.base_url + "/v1", api_key="unused", max_tokens=120,
                       logit_bias=BIAS, extra_body={"grammar": grammar})
    message = model.bind_tools([TOOL_WEATHER]).invoke("What is the weather like in Paris?")
    assert message.tool_calls and message.tool_calls[0]["args"] == {"city": "Paris", "unit": "celsius"}
    ollama_answer = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        "model": "smol-tools", "messages": TOOL_ASK, "tools": [TOOL_WEATHER], "stream": False, "think": True,
        "options": {"num_predict": 120}, "grammar": grammar, "logit_bias": BIAS}).json()
    assert "error" not in ollama_answer  # the Ollama API accepts tools for this model (no grammar there: any text)
