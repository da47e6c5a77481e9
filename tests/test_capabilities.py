"""Capabilities: what a model can do, read from what it is (registry/capabilities.py), shown by /api/show and
`mgr show`, and a request that needs what the model lacks answered with Ollama's 400 in every API, through the
real ollama and openai clients, before any runner starts. The model is the real SmolLM2 GGUF, whose template
has no tool or think syntax and whose tokenizer declares no fill-in-the-middle tokens."""

from __future__ import annotations

import base64

import httpx
import ollama
import openai
import pytest
from conftest import Daemon

from mgr.registry.capabilities import capabilities

# A 1x1 PNG
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HERMES = ("{%- if tools %}<tools>{{ tools | tojson }}</tools>{%- endif %}"
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}")
QWEN3 = "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}"


@pytest.mark.parametrize(("template", "info", "files", "expected"), [
    ("{{ messages }}", {"general.architecture": "llama"}, ["m.gguf"], ["completion"]),
    (HERMES, {"general.architecture": "qwen2"}, ["m.gguf"], ["completion", "tools"]),
    (HERMES + QWEN3, {"general.architecture": "qwen3"}, ["m.gguf"], ["completion", "tools", "thinking"]),
    ("", {"general.architecture": "llama"}, ["m.gguf", "mmproj-m-f16.gguf"], ["completion", "vision"]),
    ("", {"general.architecture": "qwen2_5_vl", "general.vision": True}, ["model.safetensors"],
     ["completion", "vision"]),
    ("", {"general.architecture": "qwen2", "tokenizer.ggml.fim_pre_token_id": 1,
          "tokenizer.ggml.fim_suf_token_id": 2, "tokenizer.ggml.fim_mid_token_id": 3}, ["m.gguf"],
     ["completion", "insert"]),
    ("", {"general.architecture": "bert", "bert.pooling_type": 1}, ["m.gguf"], ["embedding"]),
    ("", {"general.architecture": "bert", "architectures": ["BertModel"]}, ["model.safetensors"], ["embedding"]),
])
def test_capabilities_come_from_what_the_model_is(template: str, info: dict[str, object], files: list[str],
                                                  expected: list[str]) -> None:
    assert capabilities(template, info, files) == expected


@pytest.fixture(scope="module")
def clients(daemon: Daemon, smollm2: str) -> tuple[ollama.Client, openai.OpenAI]:
    return ollama.Client(host=daemon.base_url), openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")


def test_show_lists_what_smollm2_can_do(daemon: Daemon, smollm2: str) -> None:
    assert httpx.post(daemon.base_url + "/api/show", json={"model": "smollm2"}).json()["capabilities"] == \
        ["completion"]
    shown = daemon.cli("show", "smollm2")
    assert shown.returncode == 0 and "Capabilities" in shown.stdout and "completion" in shown.stdout


@pytest.mark.parametrize(("call", "missing"), [
    (lambda c: c.chat("smollm2", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER]),
     "tools"),
    (lambda c: c.chat("smollm2", messages=[{"role": "user", "content": "Hi"}], think=True), "thinking"),
    (lambda c: c.chat("smollm2", messages=[{"role": "user", "content": "Hi"}], think="high"), "thinking"),
    (lambda c: c.chat("smollm2", messages=[{"role": "user", "content": "What is this?", "images": [PNG]}]),
     "images"),
    (lambda c: c.generate("smollm2", prompt="What is this?", images=[PNG]), "images"),
    (lambda c: c.generate("smollm2", prompt="def add(a, b):", suffix="\n    return c"), "insert"),
    (lambda c: c.generate("smollm2", prompt="Hi", think=True), "thinking"),
])
def test_the_ollama_api_refuses_what_the_model_cannot_do(daemon: Daemon, clients: tuple[ollama.Client, openai.OpenAI],
                                                         call, missing: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ollama.ResponseError) as refused:
        call(clients[0])
    assert refused.value.status_code == 400
    assert refused.value.error == f'"smollm2" does not support {missing}'
    assert daemon.runner_pids() == []  # refused before anything loaded


@pytest.mark.parametrize(("kwargs", "missing"), [
    ({"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]}, "tools"),
    ({"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "tool_choice": "auto"}, "tools"),
    ({"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "low"}, "thinking"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]}, "images"),
])
def test_the_openai_api_refuses_what_the_model_cannot_do(daemon: Daemon, clients: tuple[ollama.Client, openai.OpenAI],
                                                         kwargs: dict[str, object], missing: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        clients[1].chat.completions.create(model="smollm2", **kwargs)  # type: ignore[call-overload]
    assert refused.value.status_code == 400
    assert refused.value.body["message"] == f'"smollm2" does not support {missing}'  # type: ignore[index]
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        clients[1].completions.create(model="smollm2", prompt="def add(a, b):", suffix="\n    return c")
    assert daemon.runner_pids() == []


@pytest.mark.parametrize("choice", [
    "sometimes", {"type": "function", "function": {"name": "not_a_tool"}}, {"type": "function"},
])
def test_a_bad_tool_choice_is_a_400_in_both_apis(daemon: Daemon, smollm2: str, choice: object) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
            "tool_choice": choice, "stream": False}
    for path in ("/api/chat", "/v1/chat/completions"):
        answer = httpx.post(daemon.base_url + path, json=body)
        assert answer.status_code == 400, (path, answer.text)
        assert "tool_choice" in str(answer.json()["error"])


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "tools": "get_weather"}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi", "images": ["not base64!"]}]}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "think": "very"}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 99}),
    ("/api/chat", {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}),
    ("/api/embed", {"input": "Hi", "dimensions": -1}),
    ("/api/embed", {"input": "Hi", "dimensions": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "max"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "parallel_tool_calls": "yes"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER],
                              "tool_choice": "required", "n": 0}),
    ("/v1/completions", {"prompt": "Hi", "suffix": 3}),
])
def test_malformed_fields_are_400s_in_the_called_apis_shape(daemon: Daemon, smollm2: str, path: str,
                                                          body: dict[str, object]) -> None:
    answer = httpx.post(daemon.base_url + path, json={"model": "smollm2", "stream": False, **body}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert isinstance(error, dict if path.startswith("/v1/") else str)
