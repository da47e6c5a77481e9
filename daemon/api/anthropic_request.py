"""Anthropic Messages bodies (POST /v1/messages, /v1/messages/count_tokens) as the one internal ChatRequest
(operations.py), every field checked with Anthropic's 400 for what is wrong.

The system prompt (a string or text blocks) becomes a system message; text and image blocks OpenAI content
parts (base64 as a data: URL, a url source as the URL); an assistant's tool_use blocks its tool_calls, its
thinking blocks its reasoning_content (redacted_thinking is dropped: nothing a local model can read); each
tool_result block a role "tool" message, put before what else its user turn says, as OpenAI wants results
right after the calls (is_error: the text says so, as OpenAI has no such flag). Tools become OpenAI function
tools; tool_choice auto/any/tool/none OpenAI's auto/required/named/none, disable_parallel_tool_use
parallel_tool_calls false; thinking enabled/disabled/adaptive the request's thinking on/off/the model's way.
Fields mgr has no use for (metadata, cache_control, service_tier, container, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BadRequest
from ..protocol import shapes
from ..protocol.limits import INT32_MAX
from . import fields
from .operations import ChatRequest, Target, required_str

IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # what Anthropic takes
MIN_THINKING_BUDGET = 1024  # Anthropic's lower bound on budget_tokens


def messages_request(body: dict[str, Any], counting: bool = False) -> tuple[ChatRequest, bool]:
    """The body as a ChatRequest, and whether the client wants the model's reasoning shown (thinking.display
    "omitted" hides it). `counting`: for count_tokens, where max_tokens is not sent."""
    model = required_str(body, "model")
    max_tokens = None if counting else _max_tokens(body)
    thinking, shown = _thinking(body.get("thinking"), max_tokens)
    messages = _messages(body.get("messages"))
    system = _system(body.get("system"))
    if system:
        messages.insert(0, {"role": "system", "content": system})
    tools = _tools(body.get("tools"))
    choice, parallel = _tool_choice(body.get("tool_choice"), tools)
    sampling: shapes.SamplingFields = {}
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):  # the runners' ranges (Anthropic's temperature is narrower: 0 to 1)
        if body.get(key) is not None:
            sampling[key] = fields.sampling_number(key, body[key], key)
    if body.get("top_k") is not None:  # Anthropic's top_k has no -1 ("off" to the runners)
        sampling["top_k"] = fields.whole_number("top_k", body["top_k"], 0, INT32_MAX)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop_sequences must be a list of strings")
        if stops:
            sampling["stop"] = stops
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    op = ChatRequest(target=Target(model), messages=messages, stream=stream, sampling=sampling, tools=tools,
                     tool_choice=choice, parallel_tool_calls=parallel, thinking=thinking,
                     images=any(_has_image(m) for m in messages))
    return op, shown


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_tokens")
    if value is None:
        raise BadRequest("max_tokens: field required")
    return fields.whole_number("max_tokens", value, 1, INT32_MAX)


def _thinking(value: Any, max_tokens: int | None) -> tuple[bool | None, bool]:
    """Anthropic's thinking config as the request's thinking (None: the model's own way) and whether the
    reasoning is shown. Without the field Anthropic does not think, so neither does the model where its
    template can be told (enable_thinking false); one that reasons anyway still has its reasoning shown."""
    if value is None:
        return False, True
    if not isinstance(value, dict):
        raise BadRequest('thinking must be an object: {"type": "enabled", "budget_tokens": N} or '
                         '{"type": "disabled"}')
    shown = value.get("display") != "omitted"
    kind = value.get("type")
    if kind == "disabled":
        return False, shown
    if kind == "adaptive":
        return None, shown
    if kind != "enabled":
        raise BadRequest('thinking.type must be "enabled", "disabled" or "adaptive"')
    budget = value.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
        raise BadRequest(f"thinking.budget_tokens must be a whole number of at least {MIN_THINKING_BUDGET}")
    if max_tokens is not None and budget >= max_tokens:
        raise BadRequest("max_tokens must be greater than thinking.budget_tokens")
    return True, shown


def _system(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise BadRequest("system must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise BadRequest(f'system[{i}] must be a text block: {{"type": "text", "text": "..."}}')
        texts.append(block["text"])
    return "\n".join(texts)  # blocks are separate paragraphs to whoever wrote them (Claude Code's are)


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f'{where}.content[{j}] must be a content block with a "type"')
    return content


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise BadRequest(f"{where}: a text block needs text (a string)")
    return text


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An image block as an OpenAI image_url part: base64 as a data: URL, a url source as the URL (vLLM
    fetches it; the llama.cpp runner answers that it fetches nothing)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")  # type: ignore[union-attr]
        if media not in IMAGE_TYPES:
            raise BadRequest(f"{where}.source.media_type must be one of {', '.join(IMAGE_TYPES)}")
        if not isinstance(data, str) or not data:
            raise BadRequest(f"{where}.source.data must be the image, base64-encoded")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = source.get("url")  # type: ignore[union-attr]
        if not isinstance(url, str) or not url:
            raise BadRequest(f"{where}.source.url must be the image's URL")
    else:
        raise BadRequest(f'{where}.source must be {{"type": "base64", "media_type", "data"}} or '
                         '{"type": "url", "url"} (mgr has no Files API)')
    return {"type": "image_url", "image_url": {"url": url}}


def _parts(pieces: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text and image parts as OpenAI content: a string when there is only text (blocks on lines of their
    own), else the parts, adjacent texts joined the same way."""
    merged: list[dict[str, Any]] = []
    for piece in pieces:
        if piece["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + "\n" + piece["text"]}
        else:
            merged.append(piece)
    if all(p["type"] == "text" for p in merged):
        return merged[0]["text"] if merged else ""
    return merged


def _tool_result(block: dict[str, Any], where: str, names: dict[str, str]) -> shapes.ChatMessage:
    ident = block.get("tool_use_id")
    if not isinstance(ident, str) or not ident:
        raise BadRequest(f"{where}: a tool_result block needs tool_use_id")
    content = block.get("content")
    pieces: list[dict[str, Any]] = []
    if isinstance(content, str):
        pieces.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for k, inner in enumerate(content):
            kind = inner.get("type") if isinstance(inner, dict) else None
            if kind == "text":
                pieces.append({"type": "text", "text": _text(inner, f"{where}.content[{k}]")})
            elif kind == "image":
                pieces.append(_image(inner, f"{where}.content[{k}]"))
            else:
                raise BadRequest(f"{where}.content[{k}]: a tool result holds text and image blocks")
    elif content is not None:
        raise BadRequest(f"{where}.content must be a string or a list of text and image blocks")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise BadRequest(f"{where}.is_error must be true or false")
    if is_error:  # OpenAI's tool message has no such flag: the model reads it
        pieces.insert(0, {"type": "text", "text": "Error:"})
    message: shapes.ChatMessage = {"role": "tool", "tool_call_id": ident, "content": _parts(pieces)}
    if ident in names:
        message["name"] = names[ident]
    return message


def _messages(raw: Any) -> list[shapes.ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: at least one message is required")
    out: list[shapes.ChatMessage] = []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that refer to it
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f'{where}.role must be "user" or "assistant" (the system prompt is the "system" field)')
        blocks = _blocks(message.get("content"), where)
        if role == "assistant":
            out.append(_assistant(blocks, where, names))
            continue
        pieces: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            kind, at = block["type"], f"{where}.content[{j}]"
            if kind == "text":
                pieces.append({"type": "text", "text": _text(block, at)})
            elif kind == "image":
                pieces.append(_image(block, at))
            elif kind == "tool_result":
                out.append(_tool_result(block, at, names))
            elif kind == "document" and isinstance(block.get("source"), dict) and block["source"].get("type") == "text":
                pieces.append({"type": "text", "text": _text({"text": block["source"].get("data")}, f"{at}.source")})
            else:
                raise BadRequest(f"{at}: a user turn holds text, image, tool_result and plain-text document "
                                 f"blocks, not {kind!r}")
        if pieces:
            out.append({"role": "user", "content": _parts(pieces)})
    return out


def _assistant(blocks: list[dict[str, Any]], where: str, names: dict[str, str]) -> shapes.ChatMessage:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[shapes.ToolCall] = []
    for j, block in enumerate(blocks):
        kind, at = block["type"], f"{where}.content[{j}]"
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "thinking":
            thinking = block.get("thinking")
            if not isinstance(thinking, str):
                raise BadRequest(f"{at}: a thinking block needs thinking (a string)")
            thoughts.append(thinking)
        elif kind == "redacted_thinking":
            continue  # Anthropic's encrypted reasoning: nothing a local model can read
        elif kind == "tool_use":
            ident, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(ident, str) or not ident or not isinstance(name, str) or not name:
                raise BadRequest(f"{at}: a tool_use block needs an id and a name")
            if not isinstance(arguments, dict):
                raise BadRequest(f"{at}.input must be an object")
            names[ident] = name
            calls.append({"id": ident, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        else:
            raise BadRequest(f"{at}: an assistant turn holds text, thinking, redacted_thinking and tool_use "
                             f"blocks, not {kind!r}")
    message: shapes.ChatMessage = {"role": "assistant", "content": "\n".join(texts)}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _has_image(message: shapes.ChatMessage) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(p.get("type") == "image_url" for p in content)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """Anthropic tools ({name, description, input_schema}) as OpenAI function tools."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRequest("tools must be a list")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools[{i}] must be an object")
        kind, name, schema = tool.get("type"), tool.get("name"), tool.get("input_schema")
        if kind not in (None, "custom"):
            raise BadRequest(f"tools[{i}]: Anthropic's server tools ({kind}) run on Anthropic's servers; "
                             "send client tools with name and input_schema")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}].name: field required")
        if not isinstance(schema, dict):
            raise BadRequest(f"tools[{i}].input_schema must be a JSON schema object")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise BadRequest(f"tools[{i}].description must be a string")
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> tuple[shapes.ToolChoice | None, bool | None]:
    """Anthropic's tool_choice as OpenAI's, with parallel_tool_calls from disable_parallel_tool_use."""
    if value is None:
        return None, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise BadRequest('tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...} '
                         'or {"type": "none"}')
    disable = value.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise BadRequest("tool_choice.disable_parallel_tool_use must be true or false")
    parallel = False if disable else None
    if kind == "none":
        return "none", None
    if kind == "auto":
        return "auto", parallel
    if not tools:
        raise BadRequest(f'tool_choice "{kind}" needs tools')
    if kind == "any":
        return "required", parallel
    name = value.get("name")
    if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names the tool {name!r}, which is not among the tools")
    return {"type": "function", "function": {"name": name}}, parallel


def tokenize_body(op: ChatRequest, model: str) -> shapes.TokenizeChatBody:
    """The prompt a ChatRequest makes, for the runner's /tokenize: ChatRequest.tokenize_body (messages, the
    request's template) with what else changes the prompt as runner_body sends it: the tools the template
    renders and the thinking switch."""
    body = op.tokenize_body(model)
    if op.tools and op.tool_choice != "none":
        body["tools"] = op.tools
    if op.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": op.thinking is not False}
    return body
