"""What one choice's generated text becomes on the wire: reasoning, content and tool calls as OpenAI chat
deltas (streamed) or a whole message, and the engine's logprobs in chat's and legacy completions' shapes."""

from __future__ import annotations

from typing import Any

from ...protocol import shapes
from .engine import LogprobEntry
from .reasoning import ReasoningSplitter
from .tool_calls import CallDelta, Piece, ToolCallParser


class ChatOutput:
    """One choice's parsers: the reasoning split first, then tool calls out of what is content."""

    def __init__(self, reasoning: ReasoningSplitter | None, tools: ToolCallParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.n_calls > 0

    def feed(self, text: str) -> shapes.ChatDelta:
        thought = ""
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(text)
        pieces: list[Piece] = [text] if self.tools is None else self.tools.feed(text) if text else []
        return delta(thought, pieces)

    def finish(self) -> shapes.ChatDelta:
        thought, pieces = "", list[Piece]()
        if self.reasoning is not None:
            thought, text = self.reasoning.finish()
            if text:
                pieces = [text] if self.tools is None else self.tools.feed(text)
        if self.tools is not None:
            pieces += self.tools.finish()
        return delta(thought, pieces)


def delta(reasoning: str, pieces: list[Piece]) -> shapes.ChatDelta:
    """A chat delta from reasoning text and parser pieces; a call's pieces in one delta are merged into one
    entry per call (its index once)."""
    out: shapes.ChatDelta = {}
    if reasoning:
        out["reasoning_content"] = reasoning
    content = "".join(p for p in pieces if isinstance(p, str))
    if content:
        out["content"] = content
    calls: list[shapes.ToolCallDelta] = []
    for piece in pieces:
        if not isinstance(piece, CallDelta):
            continue
        if piece.id is not None:
            calls.append({"index": piece.index, "id": piece.id, "type": "function",
                          "function": {"name": piece.name or "", "arguments": piece.arguments}})
        elif calls and calls[-1]["index"] == piece.index:
            calls[-1]["function"]["arguments"] = calls[-1]["function"].get("arguments", "") + piece.arguments
        else:
            calls.append({"index": piece.index, "function": {"arguments": piece.arguments}})
    if calls:
        out["tool_calls"] = calls
    return out


class Message:
    """A whole answer's message, put together from its deltas."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[shapes.ToolCall] = []

    def add(self, d: shapes.ChatDelta) -> None:
        if "content" in d and d["content"]:
            self.content.append(d["content"])
        if "reasoning_content" in d:
            self.reasoning.append(d["reasoning_content"])
        for call in d.get("tool_calls", []):
            function = call.get("function", {})
            if "id" in call:
                self.calls.append({"id": call["id"], "type": "function",
                                   "function": {"name": function.get("name", ""), "arguments": ""}})
            self.calls[call["index"]]["function"]["arguments"] += function.get("arguments", "")

    def build(self) -> shapes.ChatMessage:
        content = "".join(self.content)
        message: shapes.ChatMessage = {"role": "assistant", "content": None if self.calls and not content else content}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = self.calls
        return message


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[LogprobEntry]) -> list[shapes.TokenLogprob]:
    return [{"token": _text(token), "logprob": logprob, "bytes": list(token),
             "top_logprobs": [{"token": _text(t), "logprob": lp, "bytes": list(t)} for t, lp in top]}
            for token, logprob, top in entries]


class TextLogprobs:
    """Legacy completions logprobs: tokens, their logprobs, the top alternatives (with the chosen token, as
    vLLM answers: up to N + 1 entries) and each token's offset in the choice's text."""

    def __init__(self, offset: int) -> None:
        self.offset = offset  # where the next token starts in the choice's text (after an echoed prompt)

    def shape(self, entries: list[LogprobEntry]) -> shapes.TextLogprobs:
        tokens: list[str] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for token, logprob, top in entries:
            text = _text(token)
            tokens.append(text)
            logprobs.append(logprob)
            alternatives: dict[str, Any] = {_text(t): lp for t, lp in top}
            alternatives.setdefault(text, logprob)
            tops.append(alternatives)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def merge_text_logprobs(parts: list[shapes.TextLogprobs]) -> shapes.TextLogprobs:
    merged: shapes.TextLogprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        merged["tokens"] += part["tokens"]
        merged["token_logprobs"] += part["token_logprobs"]
        merged["top_logprobs"] = (merged["top_logprobs"] or []) + (part["top_logprobs"] or [])
        merged["text_offset"] += part["text_offset"]
    return merged
