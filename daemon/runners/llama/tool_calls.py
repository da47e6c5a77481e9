"""Tool calls parsed out of generated text, per chat-template family, incrementally (text arrives in pieces).

Families, told apart by the chat template's text (`detect_family`):

    hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated     Hermes, Qwen 2.5/3, many
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]                    Mistral v3, v7
             [TOOL_CALLS]name[ARGS]{...} (or name[CALL_ID]id[ARGS]{...}), repeated   Mistral v11+ (tekken)
    llama3   {"name": ..., "parameters": {...}} at the start (`;` between several), or after <|python_tag|>
    granite  <|tool_call|>[{...}, ...]  (Granite 3; Phi-4-mini closes it with <|/tool_call|>)
    json     a bare JSON call, or a list of calls, at the start: any other template, and every forced call

A call object names its arguments "arguments" or "parameters" (arguments sent as a JSON string are taken as
that string); {"function": {"name", "arguments"}} is read too. Text outside calls is content and streams as
it comes: the parser holds back only what may be the start of a marker, and whitespace next to it (which is
dropped when a call follows). A call streams as OpenAI streams it: a first delta with index, id and name as
soon as the name is known and the text is surely a call, then pieces of the arguments' JSON text. A bare
JSON value is a call only when it names one of the tools (or the grammar forced it); otherwise it is
content, as written, and so is a marker whose body is not a call.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
from collections.abc import Collection
from typing import Any, Literal

Family = Literal["hermes", "mistral", "llama3", "granite", "json"]

_START: dict[Family, tuple[str, ...]] = {
    "hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>",),
    "granite": ("<|tool_call|>",), "json": (),
}
_END: dict[Family, tuple[str, ...]] = {
    "hermes": ("</tool_call>",), "mistral": (), "llama3": (), "granite": ("<|/tool_call|>",), "json": (),
}
_BARE: frozenset[Family] = frozenset({"llama3", "json"})  # a call may open the output without a marker
# The markers, some of which are control tokens (not rendered as text unless asked): the engine renders these
# for a request whose output this parser reads.
MARKERS: dict[Family, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "llama3": ("<|python_tag|>",), "granite": ("<|tool_call|>", "<|/tool_call|>"), "json": (),
}
ARGUMENT_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"


def detect_family(template: str | None) -> Family:
    """The tool-call syntax a chat template teaches its model."""
    text = template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and '"parameters"' in text):
        return "llama3"
    if "<|tool_call|>" in text:
        return "granite"
    return "json"


def new_call_id(family: Family) -> str:
    """OpenAI-style ids; Mistral's templates insist on 9 alphanumeric characters."""
    if family == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + secrets.token_hex(12)


@dataclasses.dataclass
class CallDelta:
    """A piece of a streamed call: a call's first piece carries its id and name, later ones arguments text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Piece = str | CallDelta  # content text, or a piece of a call


class _Frame:
    """An open JSON container while scanning; a call object also records where its members' values are."""

    __slots__ = ("kind", "expect_key", "key", "value_start", "members", "start", "end")

    def __init__(self, kind: str, start: int) -> None:
        self.kind = kind  # "{" or "["
        self.expect_key = kind == "{"
        self.key: str | None = None
        self.value_start = -1  # where the current member's value starts (-1: none yet)
        self.members: dict[str, tuple[int, int]] | None = None  # call objects only: key -> (start, end)
        self.start = start
        self.end = -1


class _JsonScanner:
    """Finds where one JSON value (an object or an array) ends in text that grows, and the members of the
    call objects in it: the value itself (call_depth 1), the elements of an array (call_depth 2), none (0)."""

    def __init__(self, call_depth: int) -> None:
        self.text = ""
        self.end = -1  # where the value ended (exclusive), once it has
        self.bad = False  # it is not JSON
        self.calls: list[_Frame] = []  # call objects, in order; end >= 0 once closed
        self._call_depth = call_depth
        self._pos = 0
        self._stack: list[_Frame] = []
        self._in_string = False
        self._in_key = False
        self._escape = False
        self._key_start = -1
        self._primitive = -1  # where a number or literal being read started

    def feed(self, text: str) -> None:
        self.text += text
        text, stack = self.text, self._stack
        i, n = self._pos, len(self.text)
        while i < n and self.end < 0 and not self.bad:
            c = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    if self._in_key:
                        self._in_key = False
                        top = stack[-1]
                        try:
                            top.key = json.loads(text[self._key_start : i + 1])
                        except ValueError:
                            self.bad = True
                        top.expect_key = False
                    else:
                        self._value_end(i + 1)
                i += 1
                continue
            if self._primitive >= 0 and (c in _WS or c in ",]}"):
                self._primitive = -1
                self._value_end(i)
            if c == '"':
                self._in_string = True
                if stack and stack[-1].expect_key:
                    self._in_key = True
                    self._key_start = i
                else:
                    self._value_start(i)
            elif c == "{" or c == "[":
                self._value_start(i)
                frame = _Frame(c, i)
                stack.append(frame)
                if c == "{" and len(stack) == self._call_depth:
                    frame.members = {}
                    self.calls.append(frame)
            elif c == "}" or c == "]":
                if not stack or (c == "}") != (stack[-1].kind == "{"):
                    self.bad = True
                    break
                frame = stack.pop()
                frame.end = i + 1
                self._value_end(i + 1)
            elif c == ",":
                if not stack:
                    self.bad = True
                    break
                top = stack[-1]
                top.expect_key = top.kind == "{"
                top.key = None
                top.value_start = -1
            elif c == ":":
                if not stack or stack[-1].kind != "{" or stack[-1].key is None or stack[-1].value_start >= 0:
                    self.bad = True
                    break
            elif c in _WS:
                pass
            elif c in "-0123456789.eE+truefalsn":
                if self._primitive < 0:
                    self._primitive = i
                    self._value_start(i)
            else:
                self.bad = True
                break
            i += 1
        self._pos = i

    def _value_start(self, i: int) -> None:
        if not self._stack:
            return
        top = self._stack[-1]
        if top.kind == "{" and (top.expect_key or top.key is None):
            self.bad = True
            return
        top.value_start = i

    def _value_end(self, end: int) -> None:
        if not self._stack:
            self.end = end
            return
        top = self._stack[-1]
        if top.members is not None and top.key is not None and top.value_start >= 0:
            top.members[top.key] = (top.value_start, end)

    def open_member(self, frame: _Frame) -> tuple[str | None, int]:
        """The member of `frame` whose value is being read now: (key, where its value starts)."""
        if frame.end >= 0 or frame.key is None or frame.value_start < 0 or frame.key in (frame.members or {}):
            return None, -1
        return frame.key, frame.value_start


@dataclasses.dataclass
class _Call:
    id: str
    name: str
    index: int = -1  # set when announced
    sent: int = -1  # how far into the body's text its arguments went out (-1: none yet)
    dropped: bool = False  # over max_calls: parsed, never sent


class ToolCallParser:
    """feed() the generated text as it comes and finish() at the end; both return content text and call
    deltas, in order. `names`: the tools' names (a bare JSON value is a call only when it names one);
    `forced`: the output is a call by construction (a grammar made it); `max_calls`: 1 when parallel tool
    calls are off (later calls are parsed and dropped)."""

    def __init__(self, family: Family, names: Collection[str] | None = None, *, forced: bool = False,
                 max_calls: int | None = None) -> None:
        self.family: Family = "json" if forced else family
        self.names = set(names) if names is not None else None
        self.forced = forced
        self.max_calls = max_calls
        self.n_calls = 0  # calls announced so far
        self._starts = _START[self.family]
        self._ends = _END[self.family]
        self._bare = self.family in _BARE
        self._buf = ""
        self._state: Literal["start", "text", "name", "body", "after"] = "start" if self._bare else "text"
        self._marker = ""  # the marker that opened the current body ("" for a bare one)
        self._scanner: _JsonScanner | None = None
        self._calls: list[_Call | None] = []  # per call object of the body: None when it is not a call
        self._named: _Call | None = None  # mistral v11: the call whose arguments the body is

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self._buf += text
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        while self._step(out, final=True):
            pass
        return out

    # states: each returns True when it moved on (run again), False when it needs more text ---------
    def _step(self, out: list[Piece], final: bool) -> bool:
        state = self._state
        if state == "text":
            return self._text(out, final)
        if state == "body":
            return self._body(out, final)
        if state == "start":
            return self._start(out, final)
        if state == "after":
            return self._after(final)
        return self._name(out, final)

    def _start(self, out: list[Piece], final: bool) -> bool:
        """Only whitespace so far: a bare call may still come."""
        stripped = self._buf.lstrip(_WS)
        if not stripped:
            if final:
                _content(out, self._buf)
                self._buf = ""
            return False
        if stripped[0] in "{[":
            self._open("", stripped)
        else:
            self._state = "text"
        return True

    def _text(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        found, marker = -1, ""
        for start in self._starts:
            i = buf.find(start)
            if i >= 0 and (found < 0 or i < found):
                found, marker = i, start
        if found >= 0:
            _content(out, buf[:found].rstrip(_WS))  # whitespace before a call is dropped
            self._open(marker, buf[found + len(marker) :])
            return True
        if final:
            if buf.strip(_WS) or not self.n_calls:
                _content(out, buf)
            self._buf = ""
            return False
        keep = _held_back(buf, self._starts) if self._starts else 0
        emit = buf[: len(buf) - keep]
        body = emit.rstrip(_WS)  # whitespace waits for what follows it: dropped before a call
        if self._starts and body:
            _content(out, body)
            self._buf = buf[len(body) :]
        elif not self._starts:
            _content(out, buf)
            self._buf = ""
        return False

    def _open(self, marker: str, rest: str) -> None:
        self._marker = marker
        self._buf = rest
        self._scanner = None
        self._calls = []
        self._named = None
        self._state = "body"

    def _name(self, out: list[Piece], final: bool) -> bool:
        """mistral v11: `name[ARGS]{...}`, or `name[CALL_ID]id[ARGS]{...}`."""
        i = self._buf.find("[ARGS]")
        if i < 0:
            if final or len(self._buf) > 256:
                self._not_a_call(out, self._buf)
                return True
            return False
        head, rest = self._buf[:i], self._buf[i + len("[ARGS]") :]
        name, _, model_id = (part.strip(_WS) for part in head.partition("[CALL_ID]"))
        if not name or any(c in name for c in _WS + "{}[]\"'"):
            self._not_a_call(out, self._buf)
            return True
        self._named = _Call(model_id or new_call_id(self.family), name)
        self._announce(out, self._named)
        self._buf = rest
        self._state = "body"
        return True

    def _body(self, out: list[Piece], final: bool) -> bool:
        scanner = self._scanner
        if scanner is None:
            stripped = self._buf.lstrip(_WS)
            if not stripped:
                if final:
                    self._incomplete(out, self._buf)
                return False
            if stripped[0] not in "{[":
                if self.family == "mistral" and self._marker and self._named is None:
                    self._state = "name"  # v11: the name comes first
                else:
                    self._not_a_call(out, self._buf)
                return True
            depth = 0 if self._named is not None else 1 if stripped[0] == "{" else 2
            scanner = self._scanner = _JsonScanner(depth)
            self._buf = stripped
        scanner.feed(self._buf)
        self._buf = ""
        if scanner.bad:
            if self._any_announced():
                self._end_body()  # a call went out already: the rest of its body is lost
                self._state = "text"
            else:
                self._not_a_call(out, scanner.text)
            return True
        self._stream(out, scanner)
        if scanner.end < 0:
            if final:
                self._incomplete(out, scanner.text)
            return False
        rest = scanner.text[scanner.end :]
        if not self._any_announced() and not self._any_dropped():
            _content(out, self._marker + scanner.text[: scanner.end])  # valid JSON, but no call in it
        self._end_body()
        self._buf = rest
        self._state = "after"
        return True

    def _after(self, final: bool) -> bool:
        """After a body: whitespace, the family's end marker, `;` between llama3 calls, then text again."""
        stripped = self._buf.lstrip(_WS)
        for end in self._ends:
            if stripped.startswith(end):
                self._buf = stripped[len(end) :]
                self._state = "text"
                return True
            if stripped and end.startswith(stripped) and not final:
                return False  # perhaps the end marker, still arriving
        if not stripped:
            if final:
                self._buf = ""
            return False
        if self.family == "llama3" and stripped[0] == ";":
            self._open(self._marker, stripped[1:])
            return True
        if self._bare and stripped[0] in "{[":
            self._open(self._marker, stripped)
            return True
        self._buf = stripped
        self._state = "text"
        return True

    # calls --------------------------------------------------------------------------------------------
    def _stream(self, out: list[Piece], scanner: _JsonScanner) -> None:
        """Deltas for what the scanner learned: each call object's first delta once it is surely a call, then
        its arguments as far as they go."""
        text = scanner.text
        if self._named is not None:
            done = scanner.end >= 0
            self._send(out, self._named, text, 0, scanner.end if done else len(text))
            return
        for i, frame in enumerate(scanner.calls):
            if i == len(self._calls):
                self._calls.append(self._recognize(out, text, frame))
                if self._calls[i] is None and frame.end < 0:
                    self._calls.pop()  # not known yet: look again when more has come
                    return
            call = self._calls[i]
            if call is None or call.dropped:
                continue
            members = frame.members or {}
            span = next((members[k] for k in ARGUMENT_KEYS if k in members), None)
            if frame.end >= 0:  # the call is complete: the rest of its arguments
                if span is not None and text[span[0]] in "{[":
                    self._send(out, call, text, span[0], span[1])
                elif call.sent < 0:
                    value = _as_call(_loads(text[frame.start : frame.end]))
                    out.append(CallDelta(call.index, arguments=value[1] if value else "{}"))
                    call.sent = frame.end
            elif span is not None and text[span[0]] in "{[":
                self._send(out, call, text, span[0], span[1])
            else:
                key, start = scanner.open_member(frame)
                if key in ARGUMENT_KEYS and text[start] in "{[":
                    self._send(out, call, text, start, len(text))

    def _recognize(self, out: list[Piece], text: str, frame: _Frame) -> _Call | None:
        """A call object as a call, once it is certain: its name known and among the tools where that
        matters; a complete object is judged whole."""
        if frame.end >= 0:
            value = _as_call(_loads(text[frame.start : frame.end]))
            name = value[0] if value is not None else None
            model_id = value[2] if value is not None else None
        else:
            name = _string_member(text, frame.members or {}, "name")
            model_id = None
        if name is None or not (self.forced or self._marker or self.names is None or name in self.names):
            return None
        call = _Call(model_id if model_id and self.family == "mistral" else new_call_id(self.family), name)
        self._announce(out, call)
        return call

    def _announce(self, out: list[Piece], call: _Call) -> None:
        if self.max_calls is not None and self.n_calls >= self.max_calls:
            call.dropped = True
            return
        call.index = self.n_calls
        self.n_calls += 1
        out.append(CallDelta(call.index, id=call.id, name=call.name))

    def _send(self, out: list[Piece], call: _Call, text: str, start: int, end: int) -> None:
        """The arguments' text from where it stopped to `end`: trailing whitespace waits (it may be the
        value's last), a value's leading whitespace never goes."""
        if call.dropped:
            return
        if call.sent < 0:
            while start < end and text[start] in _WS:
                start += 1
            call.sent = start
        piece = text[call.sent : end].rstrip(_WS)
        if piece:
            out.append(CallDelta(call.index, arguments=piece))
            call.sent += len(piece)

    def _any_announced(self) -> bool:
        return self._named is not None or any(c is not None and not c.dropped for c in self._calls)

    def _any_dropped(self) -> bool:
        return any(c is not None and c.dropped for c in self._calls) or \
            self._named is not None and self._named.dropped

    def _end_body(self) -> None:
        self._scanner = None
        self._calls = []
        self._named = None

    def _incomplete(self, out: list[Piece], text: str) -> None:
        """The output ended inside a body: calls that went out stay (cut short); otherwise it is content."""
        if not self._any_announced():
            _content(out, self._marker + text)
        self._end_body()
        self._state = "text"

    def _not_a_call(self, out: list[Piece], text: str) -> None:
        """What followed the marker is no call: the marker and the text are content."""
        _content(out, self._marker + text)
        self._end_body()
        self._marker = ""
        self._buf = ""
        self._state = "text"


def _content(out: list[Piece], text: str) -> None:
    if text:
        if out and isinstance(out[-1], str):
            out[-1] += text
        else:
            out.append(text)


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` might be the start of a marker."""
    keep = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), keep, -1):
            if text.endswith(marker[:n]):
                keep = n
                break
    return keep


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _string_member(text: str, members: dict[str, tuple[int, int]], key: str) -> str | None:
    span = members.get(key)
    value = _loads(text[span[0] : span[1]]) if span is not None else None
    return value if isinstance(value, str) and value else None


def _as_call(value: Any) -> tuple[str, str, str | None] | None:
    """A parsed JSON value as (name, arguments as JSON text, the model's id), when it is a call."""
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if isinstance(function, dict) and "name" in function:
        value = {**function, "id": value.get("id")}
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments: Any = next((value[k] for k in ARGUMENT_KEYS if k in value), {})
    if isinstance(arguments, str):
        text = arguments if _loads(arguments) is not None or arguments.strip() == "null" else json.dumps({})
    else:
        text = json.dumps(arguments, ensure_ascii=False)
    model_id = value.get("id")
    return name, text, model_id if isinstance(model_id, str) else None


def parse(text: str, family: Family, names: Collection[str] | None = None, *, forced: bool = False,
          max_calls: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A whole output at once: (content, calls as OpenAI's tool_calls)."""
    parser = ToolCallParser(family, names, forced=forced, max_calls=max_calls)
    return collect(parser.feed(text) + parser.finish())


def collect(pieces: list[Piece]) -> tuple[str, list[dict[str, Any]]]:
    """Pieces put together: the content, and the calls as OpenAI's whole tool_calls."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, str):
            content.append(piece)
        elif piece.id is not None:
            calls.append({"id": piece.id, "type": "function",
                          "function": {"name": piece.name or "", "arguments": piece.arguments}})
        else:
            calls[piece.index]["function"]["arguments"] += piece.arguments
    return "".join(content), calls
