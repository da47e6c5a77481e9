"""The runner's OpenAI chat chunks -> the Responses API's output items and streaming events, in OpenAI's order:
response.created and .in_progress; per output item .output_item.added, its parts and deltas, .output_item.done;
then response.completed (or .incomplete when cut by max_output_tokens, .failed when the runner failed). Every
event carries a sequence_number. A whole (not streamed) answer is the same events with only the final Response
kept, so both paths build their output in one place.

What a chunk's delta becomes: reasoning (`reasoning_content`, or vLLM's `reasoning`) a reasoning item whose
content is reasoning_text (and, when the request asked for a summary, the same text as its summary: mgr has no
summarizer); content a message item with one output_text part; each tool call (by its index) a function_call
item. A new kind of delta closes the item before it. When `include` asks for "reasoning.encrypted_content",
the reasoning item's encrypted_content is its text, unencrypted: a stateless client (Codex with store false)
passes it back, and the next turn's prompt gets it as the assistant's reasoning."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

from . import responses_shapes as rs
from .responses_input import new_id


class OutputAssembler:
    def __init__(self, response: rs.Response, summary: bool, reasoning_text_included: bool) -> None:
        self.response = response  # in progress: the output grows as items complete
        self.summary = summary
        self.reasoning_text_included = reasoning_text_included
        self.sequence = 0
        self.item: rs.OutputItem | None = None  # the open item
        self.text = ""  # the open item's text (a message's output_text or a reasoning item's reasoning_text)
        self.call_index: int | None = None  # the runner's index of the open function_call
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}

    # the events -----------------------------------------------------------------------------------------
    def opening(self) -> Iterator[rs.Event]:
        yield self._lifecycle("response.created")
        yield self._lifecycle("response.in_progress")

    def feed(self, chunk: dict[str, Any]) -> Iterator[rs.Event]:
        """The events for one runner chunk."""
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            self.finish = choice.get("finish_reason") or self.finish
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if thought:
                yield from self._reasoning_delta(thought)
            if delta.get("content"):
                yield from self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                yield from self._call_delta(call)

    def closing(self) -> Iterator[rs.Event]:
        """The last item's done events and response.completed (or .incomplete); the Response is final."""
        if self.item is None and not self.response["output"]:
            yield from self._open_message()  # an empty answer is still an (empty) assistant message
        yield from self._close()
        usage = self.usage
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        self.response["usage"] = {
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            # the engines do not count reasoning tokens apart from the rest
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}
        self.response["completed_at"] = int(time.time())
        if self.finish == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            yield self._lifecycle("response.incomplete")
        else:
            self.response["status"] = "completed"
            yield self._lifecycle("response.completed")

    def failed(self, message: str) -> rs.Event:
        """response.failed, after a runner failure mid-answer (the items so far stay as they were)."""
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        return self._lifecycle("response.failed")

    # items ----------------------------------------------------------------------------------------------
    def _reasoning_delta(self, piece: str) -> Iterator[rs.Event]:
        if self.item is None or self.item["type"] != "reasoning":
            yield from self._close()
            item: rs.ReasoningItem = {"id": new_id("rs"), "type": "reasoning", "status": "in_progress",
                                      "summary": [], "content": []}
            yield from self._open(item)
            yield self._part("response.content_part.added", {"type": "reasoning_text", "text": ""})
            if self.summary:
                yield self._summary_part("response.reasoning_summary_part.added", "")
        self.text += piece
        yield self._delta("response.reasoning_text.delta", piece)
        if self.summary:
            yield self._summary_text("response.reasoning_summary_text.delta", piece)

    def _text_delta(self, piece: str) -> Iterator[rs.Event]:
        if self.item is None or self.item["type"] != "message":
            yield from self._close()
            yield from self._open_message()
        self.text += piece
        yield self._delta("response.output_text.delta", piece)

    def _call_delta(self, call: dict[str, Any]) -> Iterator[rs.Event]:
        index = call.get("index", 0)
        function = call.get("function") or {}
        if self.item is None or self.item["type"] != "function_call" or self.call_index != index:
            yield from self._close()
            self.call_index = index
            item: rs.FunctionCallItem = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                                         "call_id": call.get("id") or new_id("call"),
                                         "name": function.get("name") or "", "arguments": ""}
            yield from self._open(item)
        elif function.get("name"):  # a name in pieces (no runner of mgr's does that, but OpenAI's format allows it)
            self.item["name"] += function["name"]
        piece = function.get("arguments") or ""
        if piece:
            self.text += piece
            yield self._arguments("response.function_call_arguments.delta", piece)

    def _open_message(self) -> Iterator[rs.Event]:
        item: rs.MessageItem = {"id": new_id("msg"), "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []}
        yield from self._open(item)
        yield self._part("response.content_part.added", _output_text(""))

    def _open(self, item: rs.OutputItem) -> Iterator[rs.Event]:
        self.item, self.text = item, ""
        yield {"type": "response.output_item.added", "sequence_number": self._next(),
               "output_index": self._index(), "item": cast(rs.OutputItem, dict(item))}

    def _close(self) -> Iterator[rs.Event]:
        """The open item's done events; the finished item joins the Response's output."""
        item, text = self.item, self.text
        if item is None:
            return
        if item["type"] == "message":
            part = _output_text(text)
            yield self._done("response.output_text.done", text)
            yield self._part("response.content_part.done", part)
            item["content"] = [part]
        elif item["type"] == "reasoning":
            yield self._done("response.reasoning_text.done", text)
            yield self._part("response.content_part.done", {"type": "reasoning_text", "text": text})
            item["content"] = [{"type": "reasoning_text", "text": text}]
            if self.summary:
                yield self._summary_text("response.reasoning_summary_text.done", text)
                yield self._summary_part("response.reasoning_summary_part.done", text)
                item["summary"] = [{"type": "summary_text", "text": text}]
            if self.reasoning_text_included:
                item["encrypted_content"] = text
        else:
            item["arguments"] = text
            yield self._arguments("response.function_call_arguments.done", text)
        item["status"] = "incomplete" if self.finish == "length" else "completed"
        yield {"type": "response.output_item.done", "sequence_number": self._next(),
               "output_index": self._index(), "item": item}
        self.response["output"].append(item)
        self.item, self.text, self.call_index = None, "", None

    # one builder per event shape: the open item's id and output_index, the next sequence_number ----------
    def _part(self, kind: str, part: rs.OutputText | rs.ReasoningText) -> rs.ContentPartEvent:
        return {"type": kind, "sequence_number": self._next(), "item_id": self._item_id(),
                "output_index": self._index(), "content_index": 0, "part": part}

    def _delta(self, kind: str, piece: str) -> rs.TextDeltaEvent:
        event: rs.TextDeltaEvent = {"type": kind, "sequence_number": self._next(), "item_id": self._item_id(),
                                    "output_index": self._index(), "content_index": 0, "delta": piece}
        if kind == "response.output_text.delta":
            event["logprobs"] = []
        return event

    def _done(self, kind: str, text: str) -> rs.TextDoneEvent:
        event: rs.TextDoneEvent = {"type": kind, "sequence_number": self._next(), "item_id": self._item_id(),
                                   "output_index": self._index(), "content_index": 0, "text": text}
        if kind == "response.output_text.done":
            event["logprobs"] = []
        return event

    def _summary_part(self, kind: str, text: str) -> rs.SummaryPartEvent:
        return {"type": kind, "sequence_number": self._next(), "item_id": self._item_id(),
                "output_index": self._index(), "summary_index": 0, "part": {"type": "summary_text", "text": text}}

    def _summary_text(self, kind: str, text: str) -> rs.SummaryTextEvent:
        event: rs.SummaryTextEvent = {"type": kind, "sequence_number": self._next(), "item_id": self._item_id(),
                                      "output_index": self._index(), "summary_index": 0}
        event["delta" if kind.endswith(".delta") else "text"] = text
        return event

    def _arguments(self, kind: str, text: str) -> rs.ArgumentsEvent:
        event: rs.ArgumentsEvent = {"type": kind, "sequence_number": self._next(), "item_id": self._item_id(),
                                    "output_index": self._index()}
        event["delta" if kind.endswith(".delta") else "arguments"] = text
        return event

    # bookkeeping -----------------------------------------------------------------------------------------
    def _next(self) -> int:
        self.sequence += 1
        return self.sequence - 1

    def _item_id(self) -> str:
        assert self.item is not None
        return self.item["id"]

    def _index(self) -> int:
        """The open item's output_index: the items before it are in the output already."""
        return len(self.response["output"])

    def _lifecycle(self, kind: str) -> rs.LifecycleEvent:
        # a copy: the Response changes after this event has been sent
        response = cast(rs.Response, {**self.response, "output": list(self.response["output"])})
        return {"type": kind, "sequence_number": self._next(), "response": response}


def _output_text(text: str) -> rs.OutputText:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
