"""The llama.cpp runner on a copy of SmolLM2 whose chat template is a thinking, tool-calling one (Hermes
syntax; the prompt opens a `<think>` block, as Qwen3-Thinking-2507's and DeepSeek-R1's templates do), whose
`<think>`, `</think>`, `<tool_call>` and `</tool_call>` are control tokens (rendered as nothing unless the
runner asks, as Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are) and which declares FIM tokens.

SmolLM2 knows none of this, so a grammar (and a logit bias toward the control tokens) makes it write what
such a model writes; what is tested is the runner: the reasoning split, calls in the template's syntax for
tool_choice auto, control tokens rendered for the parsers, a forced call closing the think block, and
fill-in-the-middle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import llama_runner

from mgr.daemon.runners.llama.template import ChatTemplate, normalize_messages

pytestmark = pytest.mark.slow

TEMPLATE = """{%- if tools %}<|im_start|>system
You can call functions. <tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call return <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content }}
{%- for tool_call in message.tool_calls %}<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content.split('</think>')[-1] }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}
{%- endif %}"""
CONTROL = {"<think>": 14, "</think>": 15, "<tool_call>": 9, "</tool_call>": 10}  # SmolLM2's unused control tokens
FIM = {"tokenizer.ggml.fim_pre_token_id": 6, "tokenizer.ggml.fim_suf_token_id": 7,
       "tokenizer.ggml.fim_mid_token_id": 8}
BIAS = {str(token): 30 for token in CONTROL.values()}  # where the grammar allows a marker, its control token
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius"]}},
    "required": ["city", "unit"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
THOUGHT = "The user wants the weather in Paris."


def literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal is a JSON string, for this text


@pytest.fixture(scope="module")
def model_copy(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(gguf_path)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    for text, token in CONTROL.items():
        tokens[token] = text
    path = tmp_path_factory.mktemp("model") / "smollm2-thinking.gguf"
    writer = gguf.GGUFWriter(str(path), arch=reader.fields["general.architecture"].contents())
    metadata = {
        "tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING, TEMPLATE),
        "tokenizer.ggml.tokens": MetadataDetails(gguf.GGUFValueType.ARRAY, tokens, sub_type=gguf.GGUFValueType.STRING),
        **{key: MetadataDetails(gguf.GGUFValueType.UINT32, token) for key, token in FIM.items()},
    }
    copy_with_new_metadata(reader, writer, metadata, [])
    return path


@pytest.fixture(scope="module")
def runner(model_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_runner(model_copy, tmp_path_factory.mktemp("runner") / "runner.log", "--parallel", "2",
                      "--ctx-size", "1024") as url:
        yield url


def whole(url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "temperature": 0, **body}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def streamed(url: str, **body: Any) -> dict[str, Any]:
    """The stream's deltas put together as a client does: reasoning, content, calls by index, finish."""
    response = httpx.post(url + "/v1/chat/completions", timeout=300,
                          json={"messages": ASK, "temperature": 0, "stream": True, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = {"reasoning": "", "content": "", "calls": {}, "finish": None, "deltas": []}
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[6:])["choices"]:
            delta = choice["delta"]
            result["deltas"].append(delta)
            result["finish"] = choice["finish_reason"] or result["finish"]
            result["reasoning"] += delta.get("reasoning_content", "")
            result["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                entry = result["calls"].setdefault(call["index"], {"name": "", "arguments": ""})
                entry["name"] += call.get("function", {}).get("name", "")
                entry["arguments"] += call.get("function", {}).get("arguments", "")
    return result


def test_reasoning_split_when_the_template_opened_the_block(runner: str) -> None:
    grammar = f'root ::= {literal(THOUGHT)} {literal("</think>")} {literal(chr(10) * 2 + "It is sunny.")}'
    answer = whole(runner, grammar=grammar, logit_bias=BIAS)
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == THOUGHT and message["content"] == "It is sunny."
    assert answer["choices"][0]["finish_reason"] == "stop"
    stream = streamed(runner, grammar=grammar, logit_bias=BIAS)
    assert (stream["reasoning"], stream["content"]) == (THOUGHT, "It is sunny.")
    assert sum(1 for d in stream["deltas"] if d.get("reasoning_content")) > 1  # the reasoning streamed
    assert not any("think>" in (d.get("content") or "") + d.get("reasoning_content", "") for d in stream["deltas"])
    # </think> was the control token, which renders as nothing where no parser asks for it
    raw = httpx.post(runner + "/v1/completions", timeout=60, json={
        "prompt": "<|im_start|>assistant\n<think>\n", "grammar": grammar, "logit_bias": BIAS, "temperature": 0})
    assert raw.json()["choices"][0]["text"] == THOUGHT + "\n\nIt is sunny."


def test_no_split_when_thinking_is_off(runner: str) -> None:
    """enable_thinking false: the template closes the block itself; the output is all content."""
    grammar = f'root ::= {literal("It is sunny.")}'
    on = whole(runner, grammar=grammar)
    off = whole(runner, grammar=grammar, chat_template_kwargs={"enable_thinking": False})
    assert off["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny."}
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]  # the template wrote an empty block
    assert on["choices"][0]["message"]["reasoning_content"] == "It is sunny."  # never closed: all reasoning


def test_auto_call_in_the_template_syntax(runner: str) -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    grammar = (f'root ::= {literal(THOUGHT)} {literal("</think>")} {literal(chr(10) * 2 + "Let me check.")} '
               f'{literal("<tool_call>")} {literal(chr(10) + call + chr(10))} {literal("</tool_call>")}')
    answer = whole(runner, grammar=grammar, logit_bias=BIAS, tools=[WEATHER])
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["reasoning_content"] == THOUGHT and message["content"] == "Let me check."
    [tool_call] = message["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    stream = streamed(runner, grammar=grammar, logit_bias=BIAS, tools=[WEATHER])
    assert stream["finish"] == "tool_calls" and stream["content"] == "Let me check."
    assert stream["calls"][0]["name"] == "get_weather"
    assert json.loads(stream["calls"][0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    # without the control tokens rendered, the markers would have been nothing: check they were tokens
    tokens = whole(runner, grammar=grammar, logit_bias=BIAS, tools=[WEATHER], logprobs=True)
    generated = [entry["token"] for entry in tokens["choices"][0]["logprobs"]["content"]]
    assert "</think>" in generated and "<tool_call>" in generated and "</tool_call>" in generated


def test_forced_call_closes_the_think_block(runner: str) -> None:
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        answer = whole(runner, tools=[WEATHER], tool_choice=choice, max_tokens=100)["choices"][0]
        assert answer["finish_reason"] == "tool_calls"
        assert answer["message"].get("reasoning_content", "") == ""
        arguments = json.loads(answer["message"]["tool_calls"][0]["function"]["arguments"])
        assert set(arguments) == {"city", "unit"} and arguments["unit"] == "celsius"


def test_tool_history_renders_arguments_as_an_object() -> None:
    """transformers' convention: templates get a call's arguments as an object (OpenAI sends a JSON string)."""
    messages = normalize_messages([*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    prompt = ChatTemplate(TEMPLATE, "", "").render(messages)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    # a template without tool syntax sees its call as JSON in the assistant's content
    plain = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert '[assistant] {"name": "get_weather", "arguments": {"city": "Paris"}}' in ChatTemplate(plain, "", "").render(
        messages)


def test_fill_in_the_middle(runner: str) -> None:
    def prompt_tokens(**body: Any) -> int:
        response = httpx.post(runner + "/v1/completions", json={"max_tokens": 4, "temperature": 0, **body},
                              timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]  # type: ignore[no-any-return]

    prefix, suffix = "def add(a, b):\n", "\n    return c\n"
    # [FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID]
    assert prompt_tokens(prompt=prefix, suffix=suffix) == prompt_tokens(prompt=prefix) + prompt_tokens(
        prompt=suffix) + 3
