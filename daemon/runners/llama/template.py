"""Chat templates from GGUF metadata, rendered the way Hugging Face transformers renders them.

Same Jinja environment settings (sandboxed, trim_blocks, lstrip_blocks), the same helpers (raise_exception,
tojson, strftime_now) and the same variables (messages, tools, add_generation_prompt, bos_token,
eos_token), so a template written for transformers gives the same prompt here.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .sampling import BadRequest

# Used when a GGUF carries no template: ChatML, which most small instruct models understand.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.source = source or CHATML
        self._template = env.from_string(self.source)
        self.bos_token = bos_token
        self.eos_token = eos_token
        # A template without tool syntax never shows the model its own earlier calls: they go into the
        # assistant message's content instead, as the JSON a forced call is written in.
        self.renders_tool_calls = "tool_calls" in self.source

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True, **extra: Any) -> str:
        if not self.renders_tool_calls:
            messages = [_calls_as_content(m) if m.get("tool_calls") else m for m in messages]
        try:
            return self._template.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except jinja2.exceptions.TemplateError as e:
            raise BadRequest(f"the model's chat template refused these messages: {e}") from None


def _calls_as_content(message: dict[str, Any]) -> dict[str, Any]:
    calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments", {})}
             for c in message["tool_calls"]]
    text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    content = message.get("content") or ""
    return {**message, "content": f"{content}\n{text}" if content else text}


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as templates expect them (transformers' convention): arguments as
    an object, where OpenAI sends a JSON string."""
    if not isinstance(value, list):
        raise BadRequest(f"messages[{i}].tool_calls must be a list")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f'messages[{i}].tool_calls: every call needs {{"function": {{"name": ..., '
                             '"arguments": ...}}}}')
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass  # not JSON: the template gets the text as sent
        elif arguments is None:
            arguments = {}
        calls.append({**call, "type": call.get("type", "function"), "function": {**function, "arguments": arguments}})
    return calls


def image_bytes(part: dict[str, Any], where: str) -> bytes:
    """An OpenAI image part's picture: its image_url ({"url": ...} or the URL itself) must be a base64 data:
    URL; this runner fetches nothing."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise BadRequest(f"{where}: an image_url part needs image_url.url")
    if not url.startswith("data:"):
        raise BadRequest(f"{where}: image URLs must be base64 data: URLs (data:image/png;base64,...); "
                         "this model runner does not fetch images")
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise BadRequest(f"{where}: the image's data: URL must be base64 (data:<type>;base64,<data>)")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the image's data: URL is not valid base64") from None
    if not decoded:
        raise BadRequest(f"{where}: the image is empty")
    return decoded


def normalize_messages(messages: Any, images: list[bytes] | None = None, marker: str = "") -> list[dict[str, Any]]:
    """OpenAI messages -> what templates expect: string content (text parts joined), tool calls with object
    arguments, a tool result's tool name as `name` (Ollama sends `tool_name`).

    Image parts: where `images` is given (the model has a vision projector), each becomes `marker` in the text
    and its bytes are appended to `images`, in prompt order; otherwise an image is a 400."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    if images is None:
                        raise BadRequest("the model does not support images")
                    images.append(image_bytes(part, f"messages[{i}].content[{j}]"))
                    parts.append(marker)
                else:
                    raise BadRequest(f"messages[{i}].content[{j}]: content parts must be text or image_url")
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of content parts")
        normalized = dict(message)
        normalized["content"] = content
        if message.get("tool_calls"):
            normalized["tool_calls"] = _tool_calls(message["tool_calls"], i)
        elif "tool_calls" in normalized:
            del normalized["tool_calls"]  # null or []: templates test for its presence
        if message["role"] == "tool" and "name" not in normalized and isinstance(message.get("tool_name"), str):
            normalized["name"] = message["tool_name"]
        result.append(normalized)
    return result
