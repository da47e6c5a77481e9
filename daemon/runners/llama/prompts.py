"""What a generation reads, built from a request: OpenAI's completion prompt (text or token ids), the
fill-in-the-middle prompt from the model's FIM tokens, a request's own chat template (vLLM's `chat_template`),
and vLLM's /tokenize (the token ids a generation would read)."""

from __future__ import annotations

from typing import Any

import jinja2

from ...protocol import shapes
from . import tools as tool_plans
from .engine import Engine
from .sampling import BadRequest
from .template import ChatTemplate, normalize_messages


def completion_prompt(prompt: Any) -> str | list[int]:
    """OpenAI's prompt: a string or token ids (also either one in a list of one)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise BadRequest("prompt must be a string or a non-empty list of token ids (one prompt per request)")


def fill_in_the_middle(engine: Engine, prefix: str | list[int], suffix: str) -> str | list[int]:
    """The prompt as fill-in-the-middle models are trained on it (llama-server's order): the model's prefix
    token, the text before the gap, its suffix token, the text after, its middle token; the answer is what
    goes in the gap."""
    if engine.fim is None:
        raise BadRequest("this model has no fill-in-the-middle tokens, so it does not take a suffix")
    prefix_token, suffix_token, middle_token = engine.fim
    if isinstance(prefix, str):
        return f"{prefix_token}{prefix}{suffix_token}{suffix}{middle_token}"
    tokenize = engine.tokenize
    return [*tokenize(prefix_token, False), *prefix, *tokenize(suffix_token, False), *tokenize(suffix, False),
            *tokenize(middle_token, False)]


def request_template(body: dict[str, Any], model_template: ChatTemplate, engine: Engine) -> ChatTemplate:
    """The model's chat template, or the request's own `chat_template` for this request only."""
    source = body.get("chat_template")
    if source is None:
        return model_template
    if not isinstance(source, str) or not source.strip():
        raise BadRequest("chat_template must be a non-empty string (a Jinja chat template)")
    try:
        return ChatTemplate(source, engine.bos_text, engine.eos_text)
    except jinja2.exceptions.TemplateError as e:
        raise BadRequest(f"chat_template is not a valid Jinja template: {e}") from None


def tokenize(body: dict[str, Any], model_template: ChatTemplate, engine: Engine) -> shapes.TokenizeAnswer:
    """vLLM's /tokenize: a prompt, or messages rendered by the chat template (the request's own if it sends
    one), as the token ids a generation would read (BOS added as a generation adds it)."""
    if "messages" in body:
        messages = normalize_messages(body.get("messages"), None, "")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object")
        text = request_template(body, model_template, engine).render(
            messages, tools=tool_plans.plan(body).tools,
            add_generation_prompt=body.get("add_generation_prompt", True) is not False, **kwargs)
        add_special = body.get("add_special_tokens", False) is True
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("send a prompt (a string) or messages")
        text = prompt
        add_special = body.get("add_special_tokens", True) is not False
    bos_written = bool(engine.bos_text) and text.startswith(engine.bos_text)
    tokens = engine.tokenize(text, add_special and engine.add_bos and not bos_written)
    return {"count": len(tokens), "max_model_len": engine.n_ctx_seq, "tokens": tokens}
