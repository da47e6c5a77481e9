"""The llama.cpp runner's tool-call parsers on recorded outputs of each template family: whole, and streamed in
pieces split at every position (a call, a marker and the text before it cut anywhere), which must add up to
the same content and calls; the family told from real templates; the tool_choice rules and the grammar of a
forced call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mgr.daemon.runners.llama import tools
from mgr.daemon.runners.llama.output import ChatOutput, Message
from mgr.daemon.runners.llama.reasoning import ReasoningSplitter
from mgr.daemon.runners.llama.sampling import BadRequest
from mgr.daemon.runners.llama.tool_calls import CallDelta, Family, ToolCallParser, collect, detect_family, parse

NAMES = {"get_weather", "get_time"}
PARIS = {"city": "Paris", "unit": "celsius"}
CET = {"zone": "Europe/Paris"}

# (family, output as the model wrote it, content, [(name, arguments)])
RECORDED: list[tuple[Family, str, str, list[tuple[str, dict[str, Any]]]]] = [
    # Qwen2.5-7B-Instruct (Hermes syntax), two parallel calls
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
     "", [("get_weather", PARIS), ("get_time", CET)]),
    # Hermes-3: a sentence first
    ("hermes", 'Let me look that up for you.\n<tool_call>\n{"arguments": {"city": "Paris", "unit": "celsius"}, '
               '"name": "get_weather"}\n</tool_call>',
     "Let me look that up for you.", [("get_weather", PARIS)]),
    # no call at all; a '<' that is not a marker
    ("hermes", "Mild in Paris; 3 < 4 and <b>bold</b>.", "Mild in Paris; 3 < 4 and <b>bold</b>.", []),
    # a marker followed by something that is not a call stays content
    ("hermes", "<tool_call>I cannot call tools.</tool_call>", "<tool_call>I cannot call tools.</tool_call>", []),
    # Llama 3.1/3.2: bare JSON with "parameters"
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", PARIS)]),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "Europe/Paris"}}', "", [("get_time", CET)]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
               '{"name": "get_time", "parameters": {"zone": "Europe/Paris"}}', "",
     [("get_weather", PARIS), ("get_time", CET)]),
    # Llama 3 answering in prose, and a JSON answer that is no call
    ("llama3", "It is sunny in Paris.", "It is sunny in Paris.", []),
    ("llama3", '{"temperature": 21}', '{"temperature": 21}', []),
    # Mistral v3 (Mistral-7B-Instruct-v0.3): a list after [TOOL_CALLS]
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]', "",
     [("get_weather", PARIS), ("get_time", CET)]),
    # Mistral v11 (Mistral-Small-3.2, Devstral): name[ARGS]{...}, repeated
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                '[TOOL_CALLS]get_time[ARGS]{"zone": "Europe/Paris"}', "", [("get_weather", PARIS), ("get_time", CET)]),
    # Granite 3.x
    ("granite", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "",
     [("get_weather", PARIS)]),
    # plain JSON (any other template; the forced call's shape), a list, and arguments sent as a JSON string
    ("json", '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", PARIS)]),
    ("json", '[{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}, '
             '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', "",
     [("get_time", CET), ("get_weather", PARIS)]),
    ("json", '{"name": "get_time", "arguments": "{\\"zone\\": \\"Europe/Paris\\"}"}', "", [("get_time", CET)]),
    ("json", '{"name": "not_a_tool", "arguments": {}}', '{"name": "not_a_tool", "arguments": {}}', []),
    ("json", "Sure! Here you go.", "Sure! Here you go.", []),
    # nested values and escapes inside the arguments
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "celsius", '
               '"extra": [1, -2.5e3, true, null, {"a": "]"}]}}\n</tool_call>', "",
     [("get_weather", {"city": 'Pa"ris}', "unit": "celsius", "extra": [1, -2.5e3, True, None, {"a": "]"}]})]),
]


def _calls(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _streamed(family: Family, chunks: list[str], **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
    parser = ToolCallParser(family, NAMES, **kwargs)
    pieces = [piece for chunk in chunks for piece in parser.feed(chunk)] + parser.finish()
    return collect(pieces)


@pytest.mark.parametrize(("family", "text", "content", "calls"), RECORDED)
def test_recorded_outputs_parse(family: Family, text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    got_content, got_calls = parse(text, family, NAMES)
    assert got_content == content
    assert _calls(got_calls) == calls
    assert all(c["type"] == "function" and c["id"] for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize(("family", "text", "content", "calls"), RECORDED)
def test_split_at_every_position_gives_the_same(family: Family, text: str, content: str,
                                                calls: list[tuple[str, Any]]) -> None:
    for cut in range(len(text) + 1):
        for second in (cut, (cut + len(text)) // 2):
            got_content, got_calls = _streamed(family, [text[:cut], text[cut:second], text[second:]])
            assert (got_content, _calls(got_calls)) == (content, calls), (cut, second)
    got_content, got_calls = _streamed(family, list(text))  # one character at a time
    assert (got_content, _calls(got_calls)) == (content, calls)


def test_text_streams_before_a_call_and_arguments_stream_in_pieces() -> None:
    parser = ToolCallParser("hermes", NAMES)
    tokens = ["Let", " me", " check", ".\n", "<tool", "_call", ">\n", '{"', "name", '":', ' "get', '_weather', '",',
              ' "arguments', '":', ' {"', "city", '":', ' "', "Paris", '"}', "}\n", "</tool_call>"]
    out = [parser.feed(t) for t in tokens]
    assert out[:4] == [["Let"], [" me"], [" check"], ["."]]  # the newline waits: whitespace before a call goes
    assert out[4] == out[5] == out[6] == []  # maybe a marker: held back, never content
    header = next(o for o in out[4:] if o)[0]
    assert isinstance(header, CallDelta) and header.name == "get_weather" and header.id
    assert out.index([header]) == tokens.index('",')  # announced as soon as its name was complete
    pieces = [p for o in out for p in o if isinstance(p, CallDelta) and p.id is None]
    assert len(pieces) > 3  # the arguments came in several pieces, as they were generated
    assert json.loads("".join(p.arguments for p in pieces)) == {"city": "Paris"}
    assert parser.finish() == []


def test_held_back_only_what_may_be_a_marker() -> None:
    parser = ToolCallParser("hermes", NAMES)
    assert parser.feed("a <to") == ["a"]
    assert parser.feed("day") == [" <today"]  # not a marker after all: released at once


def test_parallel_calls_off_keeps_the_first() -> None:
    text = RECORDED[0][1]
    content, calls = parse(text, "hermes", NAMES, max_calls=1)
    assert _calls(calls) == [("get_weather", PARIS)] and content == ""
    content, calls = _streamed("hermes", list(text), max_calls=1)
    assert _calls(calls) == [("get_weather", PARIS)] and content == ""


def test_forced_output_is_a_call_whatever_the_family() -> None:
    text = '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}'
    for family in ("hermes", "mistral", "llama3", "granite", "json"):
        assert _calls(parse(text, family, NAMES, forced=True)[1]) == [("get_time", CET)]


def test_a_call_cut_short_by_max_tokens() -> None:
    content, calls = parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "hermes", NAMES)
    assert content == "" and calls[0]["function"]["name"] == "get_weather"
    content, calls = parse('<tool_call>\n{"name": "get_wea', "hermes", NAMES)
    assert content == '<tool_call>{"name": "get_wea' and calls == []  # never became a call: content


def test_reasoning_then_a_call_qwen3() -> None:
    """Qwen3: a think block, then a Hermes call; the whole message and the streamed deltas agree."""
    text = ('<think>\nThe user asks for the weather in Paris. I should call get_weather.\n</think>\n\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    for chunks in ([text], list(text), [text[:20], text[20:77], text[77:]]):
        output = ChatOutput(ReasoningSplitter(inside=False), ToolCallParser("hermes", NAMES))
        message = Message()
        for chunk in chunks:
            message.add(output.feed(chunk))
        message.add(output.finish())
        built = message.build()
        assert built["reasoning_content"] == "The user asks for the weather in Paris. I should call get_weather."
        assert built["content"] is None and output.called
        assert _calls(built["tool_calls"]) == [("get_weather", PARIS)]  # type: ignore[arg-type]


TEMPLATES = {
    "hermes": "{%- if tools %}...<tools>{{ tool | tojson }}</tools>... <tool_call>\\n{\"name\": <function-name>, "
              "\"arguments\": <args-json-object>}\\n</tool_call>{%- endif %}",
    "mistral": "{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}{%- for tool_call in message.tool_calls %}",
    "llama3": "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{{- '{\"name\": \"' + tool_call.name + "
              "'\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}",
    "granite": "{%- if message.tool_calls %}<|tool_call|>{{ message.tool_calls | tojson }}",
    "json": "{% for message in messages %}<|im_start|>{{ message['role'] }}\\n{{ message['content'] }}<|im_end|>",
}


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_family_from_the_template(family: str) -> None:
    assert detect_family(TEMPLATES[family]) == family
    assert detect_family(None) == "json"


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"],
    "$defs": {"Zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}


def test_tool_choice_rules() -> None:
    assert tools.plan({}).mode == "none"
    assert tools.plan({"tools": [WEATHER]}).mode == "auto"
    none = tools.plan({"tools": [WEATHER], "tool_choice": "none"})
    assert none.mode == "none" and none.tools is None  # nothing rendered
    required = tools.plan({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert required.forced == ["get_weather", "get_time"] and required.parallel and required.max_calls is None
    named = tools.plan({"tools": [WEATHER, TIME],
                        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert named.forced == ["get_time"] and named.max_calls == 1
    assert tools.plan({"tools": [WEATHER], "parallel_tool_calls": False}).max_calls == 1
    for bad in ({"tools": [WEATHER], "tool_choice": "always"}, {"tool_choice": "required"},
                {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                {"tools": [WEATHER], "tool_choice": {"type": "function"}}, {"tools": {"a": 1}},
                {"tools": [{"type": "function", "function": {}}]}, {"tools": [WEATHER], "parallel_tool_calls": "no"}):
        with pytest.raises(BadRequest):
            tools.plan(bad)


def test_forced_grammar_names_only_the_forced_tools() -> None:
    grammar = tools.forced_grammar(tools.plan({"tools": [WEATHER, TIME], "tool_choice": "required"}))
    assert '"\\"get_weather\\""' in grammar and '"\\"get_time\\""' in grammar and grammar.count('root ::= "["') == 1
    assert '"\\"UTC\\""' in grammar  # the $ref of get_time's parameters resolved within its own schema
    named = tools.forced_grammar(tools.plan({"tools": [WEATHER, TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}), close_think=True)
    assert "get_time" not in named and 'root ::= "</think>"' in named
