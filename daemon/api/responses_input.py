"""A Responses API request body -> the one internal ChatRequest (operations.py), with what the Response echoes
back. Input items are checked and normalized once (each gets an id; string content becomes content parts), as
they are stored for `previous_response_id`; `chat_messages` turns items (stored ones first) into chat messages.

How items become chat messages: instructions are the first system message; developer messages are system
messages (chat templates know no developer role), and the system messages before the first other message are
merged into one (many templates accept a system message only first). A function_call joins the assistant
message before it (one turn: text, then its calls) or opens one; a function_call_output is a tool message;
a reasoning item's text becomes the next assistant message's reasoning_content."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, cast

from ..errors import BadRequest
from ..protocol import shapes
from ..protocol.limits import INT32_MAX
from . import fields
from . import responses_shapes as rs
from .operations import ChatRequest, Effort, Target, optional_bool, required_str, tool_choice

# OpenAI's efforts -> the internal request's thinking (mgr's engines know low/medium/high, or off)
_EFFORTS: dict[str, bool | Effort] = {"none": False, "minimal": "low", "low": "low", "medium": "medium",
                                      "high": "high", "xhigh": "high"}
_SUMMARIES = ("auto", "concise", "detailed")
# Chat Completions fields an OpenAI client sends through extra_body (sampling extras, mgr's `grammar`): passed
# to the runner as sent, as the chat endpoint passes them. Other Responses fields (user, service_tier,
# prompt_cache_key, ...) mean nothing to a local engine and are not passed on.
_PASSED_THROUGH = ("top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "seed", "stop", "logit_bias", "grammar")
_NOT_SERVED = {"background": "background responses", "conversation": "the Conversations API",
               "prompt": "stored prompt templates"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclasses.dataclass(slots=True)
class ResponsesRequest:
    """The internal request, the request's own input items (normalized), and what the Response echoes."""

    op: ChatRequest
    items: list[rs.Item]
    instructions: str | None
    previous_response_id: str | None
    store: bool
    summary: bool  # reasoning.summary asked for: the reasoning item carries its text as a summary as well
    reasoning_text_included: bool  # include has "reasoning.encrypted_content" (see responses_events.py)
    echo: rs.Echo  # the Response fields that repeat the request (tools, text, reasoning, sampling, ...)

    def with_context(self, context: list[rs.Item]) -> None:
        """The stored conversation this one continues goes before its own input."""
        self.op.messages, self.op.images = chat_messages(self.instructions, [*context, *self.items])


def parse(body: dict[str, Any]) -> ResponsesRequest:
    for key, what in _NOT_SERVED.items():
        if body.get(key) not in (None, False):
            raise BadRequest(f"{key}: mgr does not serve {what}")
    model = required_str(body, "model")
    if "input" not in body:
        raise BadRequest("missing field 'input': a string or a list of input items")
    items = input_items(body["input"])
    instructions = _optional_str(body, "instructions")
    responses_tools, tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false")
    thinking, reasoning = _reasoning(body.get("reasoning"))
    text, response_format = _text(body.get("text"))
    sampling = _sampling(body)
    truncation = body.get("truncation") or "disabled"
    if truncation not in ("auto", "disabled"):
        raise BadRequest('truncation must be "auto" or "disabled"')
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise BadRequest("include must be a list of strings")
    messages, images = chat_messages(instructions, items)
    op = ChatRequest(
        Target(model), messages, optional_bool(body, "stream", False), sampling=sampling,
        response_format=response_format, tools=tools, tool_choice=choice,
        parallel_tool_calls=parallel if tools else None, thinking=thinking, images=images,
        # "auto" drops the oldest messages to fit the context, as OpenAI drops the oldest items
        truncate=True if truncation == "auto" else None,
        passthrough={key: body[key] for key in _PASSED_THROUGH if body.get(key) is not None})
    echo: rs.Echo = {"tools": responses_tools, "tool_choice": _echo_choice(body.get("tool_choice")), "text": text,
                     "reasoning": reasoning, "parallel_tool_calls": True if parallel is None else parallel,
                     "temperature": sampling.get("temperature"), "top_p": sampling.get("top_p"),
                     "max_output_tokens": sampling.get("max_tokens"),
                     "truncation": "auto" if truncation == "auto" else "disabled",
                     "metadata": _metadata(body.get("metadata"))}
    return ResponsesRequest(op, items, instructions, _optional_str(body, "previous_response_id"),
                            optional_bool(body, "store", True),
                            summary=reasoning is not None and reasoning["summary"] in _SUMMARIES,
                            reasoning_text_included="reasoning.encrypted_content" in include, echo=echo)


# input items ------------------------------------------------------------------------------------------
def input_items(value: Any) -> list[rs.Item]:
    """`input` (a string, or a list of items) as normalized items: each with an id and a status, message
    content as a list of parts."""
    if isinstance(value, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list) or not value:
        raise BadRequest("input must be a string or a non-empty list of input items")
    return [_item(item, f"input[{i}]") for i, item in enumerate(value)]


def _item(item: Any, where: str) -> rs.Item:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object")
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise BadRequest(f'{where}.role must be "user", "system", "developer" or "assistant"')
        message: rs.MessageItem = {"id": _ident(item, "msg", where), "type": "message", "role": role,
                                   "status": "completed", "content": _parts(item.get("content"), role, where)}
        return message
    if kind == "function_call":
        arguments = item.get("arguments", "")
        call: rs.FunctionCallItem = {
            "id": _ident(item, "fc", where), "type": "function_call", "status": "completed",
            "call_id": _field(item, "call_id", where), "name": _field(item, "name", where),
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}
        return call
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = cast(Any, _parts(output, "user", f"{where}.output", key="output"))
        result: rs.FunctionCallOutputItem = {"id": _ident(item, "fco", where), "type": "function_call_output",
                                             "status": "completed", "call_id": _field(item, "call_id", where),
                                             "output": output}
        return result
    if kind == "reasoning":
        reasoning: rs.ReasoningItem = {
            "id": _ident(item, "rs", where), "type": "reasoning",
            "summary": cast(Any, _texts(item.get("summary"), "summary_text", f"{where}.summary")),
            "content": cast(Any, _texts(item.get("content"), "reasoning_text", f"{where}.content"))}
        encrypted = item.get("encrypted_content")
        if isinstance(encrypted, str) and encrypted:
            reasoning["encrypted_content"] = encrypted
        return reasoning
    if kind == "item_reference":
        raise BadRequest(f"{where}: item references are not supported: send the item, or continue a stored "
                         "response with previous_response_id")
    if not isinstance(kind, str):
        raise BadRequest(f"{where} needs a type (message, function_call, function_call_output, reasoning)")
    raise BadRequest(f"{where}: items of type {kind!r} are not supported (mgr runs function tools only)")


def _ident(item: dict[str, Any], prefix: str, where: str) -> str:
    value = item.get("id")
    if value is None:
        return new_id(prefix)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where}.id must be a string")
    return value


def _field(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where}.{key} must be a non-empty string")
    return value


def _parts(content: Any, role: str, where: str, key: str = "content") -> list[Any]:
    """Message content as parts: a string becomes one input_text (output_text for the assistant)."""
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return [_text_part(text_type, content)]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.{key} must be a string or a list of content parts")
    parts: list[Any] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.{key}[{j}]"
        if kind in ("input_text", "output_text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise BadRequest(f"{at}.text must be a string")
            parts.append(_text_part(text_type, text))
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise BadRequest(f"{at}: an input_image needs image_url (a data: URL or a URL); "
                                 "file_id is not supported (mgr has no Files API)")
            parts.append({"type": "input_image", "image_url": url, "detail": part.get("detail") or "auto"})
        elif kind == "input_file":
            raise BadRequest(f"{at}: input_file is not supported: send the file's text as input_text")
        else:
            raise BadRequest(f"{at}: content parts must be input_text, input_image or output_text")
    return parts


def _text_part(kind: str, text: str) -> dict[str, Any]:
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def _texts(value: Any, kind: str, where: str) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        raise BadRequest(f"{where} must be a list of {{type: {kind}, text}} parts")
    return [{"type": kind, "text": p["text"]} for p in value]


# items -> chat messages ---------------------------------------------------------------------------------
def chat_messages(instructions: str | None, items: list[rs.Item]) -> tuple[list[shapes.ChatMessage], bool]:
    """The chat messages for these items (see the module's docstring), and whether any carries an image."""
    messages: list[shapes.ChatMessage] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}  # call_id -> function name, for the tool messages (templates show it)
    reasoning = ""
    images = False
    for item in items:
        if item["type"] == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning += "".join(p["text"] for p in parts) or item.get("encrypted_content", "")
        elif item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            content, image = _chat_content(item["content"], joined=role == "system")
            images = images or image
            if role == "system" and messages and all(m["role"] == "system" for m in messages):
                messages[0]["content"] = f"{messages[0]['content']}\n\n{content}"  # the opening system prompt
                continue
            message: shapes.ChatMessage = {"role": role, "content": content}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, ""
            messages.append(message)
        elif item["type"] == "function_call":
            names[item["call_id"]] = item["name"]
            call: shapes.ToolCall = {"id": item["call_id"], "type": "function",
                                     "function": {"name": item["name"], "arguments": item["arguments"]}}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            last = messages[-1]
            last["tool_calls"] = [*last.get("tool_calls", []), call]
            if reasoning:
                last["reasoning_content"], reasoning = last.get("reasoning_content", "") + reasoning, ""
        else:
            output: str | list[dict[str, Any]] = cast(Any, item["output"])
            if not isinstance(output, str):
                output, image = _chat_content(output, joined=False)
                images = images or image
            result: shapes.ChatMessage = {"role": "tool", "tool_call_id": item["call_id"], "content": output}
            if item["call_id"] in names:
                result["name"] = names[item["call_id"]]
            messages.append(result)
    return messages, images


def _chat_content(parts: list[Any], joined: bool) -> tuple[str | list[dict[str, Any]], bool]:
    """Content parts as chat content: one text part (or `joined`, all text, one per line) is a string; else
    chat's parts (text, image_url), which the engines put together."""
    texts = [p["text"] for p in parts if p["type"] != "input_image"]
    if joined or len(parts) == 1 and len(texts) == 1:
        return "\n".join(texts), False
    chat = [{"type": "image_url", "image_url": {"url": p["image_url"]}} if p["type"] == "input_image"
            else {"type": "text", "text": p["text"]} for p in parts]
    return chat, any(p["type"] == "input_image" for p in parts)


# tools, reasoning, text format, sampling ------------------------------------------------------------------
def _tools(value: Any) -> tuple[list[rs.FunctionTool], list[dict[str, Any]] | None]:
    """Responses' flat function tools, and the same in chat's nested shape for the runner."""
    if value is None or value == []:
        return [], None
    if not isinstance(value, list):
        raise BadRequest("tools must be a list of function tools")
    flat: list[rs.FunctionTool] = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise BadRequest(f"tools[{i}]: mgr runs function tools only ({{type: function, name, parameters}}); "
                             f"{kind!r} tools are not supported")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}] needs a name (Responses tools are flat: {{type, name, parameters}})")
        parameters, description, strict = tool.get("parameters"), tool.get("description"), tool.get("strict")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"tools[{i}].parameters must be a JSON schema object")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"tools[{i}].description must be a string")
        if strict is not None and not isinstance(strict, bool):
            raise BadRequest(f"tools[{i}].strict must be true or false")
        flat.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                     "strict": strict})
    chat = []
    for tool in flat:
        function: dict[str, Any] = {"name": tool["name"],
                                    "parameters": tool["parameters"] or {"type": "object", "properties": {}}}
        if tool["description"] is not None:
            function["description"] = tool["description"]
        if tool["strict"] is not None:
            function["strict"] = tool["strict"]
        chat.append({"type": "function", "function": function})
    return flat, chat


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> shapes.ToolChoice | None:
    if isinstance(value, dict):
        if value.get("type") != "function" or not isinstance(value.get("name"), str):
            raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}')
        value = {"type": "function", "function": {"name": value["name"]}}
    return tool_choice(value, tools)


def _echo_choice(value: Any) -> rs.ToolChoice:
    if isinstance(value, dict):
        return {"type": "function", "name": value["name"]}
    return cast(rs.ToolChoice, value or "auto")


def _reasoning(value: Any) -> tuple[bool | Effort | None, rs.ReasoningConfig | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise BadRequest("reasoning must be an object: {effort, summary}")
    effort = value.get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise BadRequest(f"reasoning.effort must be one of {', '.join(_EFFORTS)}")
    summary = value.get("summary", value.get("generate_summary"))
    if summary is not None and summary not in (*_SUMMARIES, "none"):
        raise BadRequest('reasoning.summary must be "auto", "concise", "detailed" or "none"')
    return (None if effort is None else _EFFORTS[effort]), {"effort": effort, "summary": summary}


def _text(value: Any) -> tuple[rs.TextConfig, shapes.ResponseFormat | None]:
    """text.format -> the runner's response_format (None for plain text)."""
    if value is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(value, dict):
        raise BadRequest("text must be an object: {format: {type: ...}}")
    fmt = value.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    echo: rs.TextConfig = {"format": cast(rs.TextFormat, fmt)}
    if isinstance(value.get("verbosity"), str):
        echo["verbosity"] = value["verbosity"]
    if kind == "text":
        return echo, None
    if kind == "json_object":
        return echo, {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("text.format.schema must be a JSON schema object")
        json_schema: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": schema}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                json_schema[key] = fmt[key]
        return echo, {"type": "json_schema", "json_schema": json_schema}
    raise BadRequest('text.format.type must be "text", "json_object" or "json_schema"')


def _sampling(body: dict[str, Any]) -> shapes.SamplingFields:
    sampling: shapes.SamplingFields = {}
    for key, upper in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
            raise BadRequest(f"{key} must be a number from 0 to {upper:g}")
        sampling[key] = float(value)  # type: ignore[literal-required]
    limit = body.get("max_output_tokens")
    if limit is not None:
        sampling["max_tokens"] = fields.whole_number("max_output_tokens", limit, 1, INT32_MAX)
    fields.check_sampling(body)  # the fields passed to the runner (_PASSED_THROUGH) among them
    if body.get("grammar") is not None and not isinstance(body["grammar"], str):
        raise BadRequest("grammar must be a string (GBNF)")
    return sampling


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                       for k, v in value.items())):
        raise BadRequest("metadata must be an object of at most 16 string keys (64 characters) and string values "
                         "(512 characters)")
    return value


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value or None
