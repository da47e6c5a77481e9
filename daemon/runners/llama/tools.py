"""What a chat request's `tools`, `tool_choice` and `parallel_tool_calls` mean for the runner: which tools the
template renders, how the output is parsed, and, for a forced call, the grammar that forces it.

    none       no tools rendered, nothing parsed
    auto       tools rendered; calls parsed out of the output in the template family's syntax
    required   a call is forced: a grammar from the tools' JSON schemas lets the model write only
               {"name": <one of the tools>, "arguments": <that tool's parameters>} (a list of them, one or
               more, when parallel_tool_calls is not false), so it parses and matches its schema whatever the
               model and whether or not its template has tool syntax (vLLM's guided decoding does the same)
    {"type": "function", "function": {"name": ...}}   as required, with that one tool: exactly one call
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Literal

from llama_cpp import llama_grammar

from .sampling import BadRequest, json_strings_only

# llama.cpp's JSON-schema-to-GBNF converter (untyped): its rules for each tool's parameters, with ours around them
_SchemaConverter: Any = llama_grammar.SchemaConverter

Mode = Literal["none", "auto", "forced"]


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    mode: Mode
    tools: list[dict[str, Any]] | None  # what the template renders
    names: list[str]  # the tools' names
    forced: list[str]  # forced: the tools a call may name
    parallel: bool

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1


def plan(body: dict[str, Any]) -> ToolPlan:
    """The request's tool fields, checked (BadRequest: the runner's 400)."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("tools must be a list")
    tools = tools or None
    names: list[str] = []
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest('every tool needs {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        parameters = function.get("parameters")  # type: ignore[union-attr]
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"the parameters of tool {name!r} must be a JSON schema object")
        names.append(name)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false")
    parallel = parallel is not False
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none" or (choice == "auto" and not tools):
        return ToolPlan("none", None, names, [], parallel)
    if choice == "auto":
        return ToolPlan("auto", tools, names, [], parallel)
    if choice == "required":
        if not tools:
            raise BadRequest('tool_choice "required" needs tools')
        return ToolPlan("forced", tools, names, names, parallel)
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
        if not isinstance(name, str) or name not in names:
            raise BadRequest(f"tool_choice names the function {name!r}, which is not among the tools")
        return ToolPlan("forced", tools, names, [name], False)
    raise BadRequest('tool_choice must be "none", "auto", "required" or '
                     '{"type": "function", "function": {"name": ...}}')


def forced_grammar(plan: ToolPlan, close_think: bool = False) -> str:
    """GBNF for a forced call: {"name": "<tool>", "arguments": <its parameters>} with the tool's schema, or
    a list of one or more of them. `close_think`: the prompt opened a think block, which the grammar closes
    first (a forced call does not reason)."""
    assert plan.tools is not None
    by_name = {t["function"]["name"]: t["function"] for t in plan.tools}
    converter = _SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    literal = converter._format_literal
    alternatives = []
    for i, name in enumerate(plan.forced):
        parameters = copy.deepcopy(by_name[name].get("parameters") or {"type": "object", "properties": {}})
        try:
            parameters = converter.resolve_refs(parameters, f"tool{i}")
            arguments = converter.visit(parameters, f"tool{i}-arguments")
        except Exception as e:  # the converter raises plain exceptions for what it does not support
            raise BadRequest(f"the parameters of tool {name!r} cannot be enforced: {e}") from None
        rule = " ".join((literal('{"name": '), literal(json.dumps(name, ensure_ascii=False)),
                         literal(', "arguments": '), arguments, literal("}")))
        alternatives.append(converter._add_rule(f"tool{i}-call", rule))
    call = converter._add_rule("call", " | ".join(alternatives))
    root = f'"[" {call} ("," space {call})* "]"' if plan.parallel else call
    if close_think:
        root = f'{literal("</think>")} "\\n"* {root}'
    converter._add_rule("root", root)
    grammar: str = converter.format_grammar()
    return json_strings_only(grammar)
