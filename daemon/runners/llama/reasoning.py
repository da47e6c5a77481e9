"""The reasoning of `<think>…</think>` models (Qwen3, DeepSeek-R1 distills, QwQ, …) split from their answer,
incrementally: what is inside the block is `reasoning_content`, what follows it is `content`.

The model opens the block itself (`<think>` first in its output), or its template opened it at the end of the
prompt, and then only `</think>` appears in the output (`opens_block`). Whitespace around the reasoning and
at the start of the answer is dropped, as Ollama drops it. Output that does not start with `<think>` (and
was not begun inside one) is all content, passed on without further looking.
"""

from __future__ import annotations

from typing import Literal

OPEN = "<think>"
CLOSE = "</think>"
_WS = " \t\r\n"


def thinks(template: str | None) -> bool:
    """Whether a chat template is one of a <think> model."""
    return bool(template) and (OPEN in template or CLOSE in template)  # type: ignore[operator]


def opens_block(prompt: str) -> bool:
    """Whether the rendered prompt ends inside a think block (the template opened it for the model)."""
    tail = prompt.rstrip(_WS)
    return tail.endswith(OPEN)


class ReasoningSplitter:
    """feed() the generated text as it comes, finish() at the end: both return (reasoning, content)."""

    def __init__(self, inside: bool) -> None:
        self._state: Literal["start", "inside", "after", "content"] = "inside" if inside else "start"
        self._buf = ""
        self._began = False  # some reasoning went out (leading whitespace is dropped until then)

    def feed(self, text: str) -> tuple[str, str]:
        if self._state == "content":
            return "", text
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        if self._state == "content":
            return "", ""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        while True:
            state, buf = self._state, self._buf
            if state == "start":
                stripped = buf.lstrip(_WS)
                if stripped.startswith(OPEN):
                    self._buf = stripped[len(OPEN) :]
                    self._state = "inside"
                    continue
                if OPEN.startswith(stripped) and not final:
                    return reasoning, ""  # perhaps <think>, still arriving
                self._state = "content"
                self._buf = ""
                return reasoning, buf
            if state == "inside":
                if not self._began:
                    buf = self._buf = buf.lstrip(_WS)
                end = buf.find(CLOSE)
                if end >= 0:
                    reasoning += buf[:end].rstrip(_WS)
                    self._buf = buf[end + len(CLOSE) :]
                    self._state = "after"
                    continue
                if final:
                    reasoning += buf.rstrip(_WS)
                    self._buf = ""
                    return reasoning, ""
                # hold back what may be the start of </think>, and trailing whitespace (dropped before it)
                keep = next((n for n in range(min(len(CLOSE) - 1, len(buf)), 0, -1) if buf.endswith(CLOSE[:n])), 0)
                emit = buf[: len(buf) - keep].rstrip(_WS)
                if emit:
                    self._began = True
                    reasoning += emit
                    self._buf = buf[len(emit) :]
                return reasoning, ""
            # after </think>: the answer, its leading whitespace dropped
            stripped = buf.lstrip(_WS)
            self._buf = ""
            if stripped:
                self._state = "content"
            return reasoning, stripped
