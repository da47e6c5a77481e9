"""`mgr run`: one-shot answers and the interactive chat, both over POST /api/chat.

Answers are streamed: each piece is written and flushed as it arrives. Ctrl+C during an interactive answer
closes that request's connection (the daemon then stops generating) and returns to the prompt; the cancelled
exchange is dropped from the conversation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Any, TextIO

from .client import APIError, Client
from .format import stats

HELP = '''Available Commands:
  /set parameter <key> <value>   Set a model option, e.g. /set parameter temperature 0.2
  /set system <text>             Set the system message (empty text removes it)
  /set verbose                   Show timing statistics after each answer
  /set quiet                     Stop showing them
  /clear                         Clear the conversation
  /bye                           Exit
  /?, /help                      Show this help

Use """ to begin a multi-line message.
'''

MULTILINE = '"""'
SET_USAGE = "Usage: /set parameter <key> <value> | /set system <text> | /set verbose | /set quiet\n"


def parse_value(text: str) -> Any:
    """A JSON value when the text is one (0.2, 42, true, ["\\n"]), the text itself otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` from `-o/--option`; raises ValueError without "=" or with an empty key."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected key=value, got {text!r}")
    return key, parse_value(value)


@dataclasses.dataclass
class Session:
    """What every chat request of one `mgr run` carries besides the messages."""

    model: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    system: str | None = None
    keep_alive: float | int | None = None  # seconds; None = the daemon's default
    format: str | None = None
    verbose: bool = False

    def body(self, messages: list[dict[str, str]], stream: bool = True) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": system + messages, "stream": stream}
        if self.options:
            body["options"] = self.options
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        if self.format:
            body["format"] = self.format
        return body


def _not_found(error: APIError, model: str) -> APIError:
    """The friendly wording for a model the store does not hold (the daemon's own text varies)."""
    if error.status == 404:
        return APIError(f'model "{model}" not found, try pulling it first', 404)
    return error


def stream_answer(client: Client, session: Session, messages: list[dict[str, str]], out: TextIO, err: TextIO) -> str:
    """Stream one answer to `out` and return its full text. The connection is closed on any exit, so a
    KeyboardInterrupt raised while waiting for the next piece cancels the generation on the daemon."""
    pieces: list[str] = []
    final: dict[str, Any] = {}
    stream = client.stream_ndjson("POST", "/api/chat", session.body(messages))
    try:
        for chunk in stream:
            piece = (chunk.get("message") or {}).get("content") or ""
            if piece:
                pieces.append(piece)
                out.write(piece)
                out.flush()
            if chunk.get("done"):
                final = chunk
    except APIError as e:
        if pieces:  # keep what was streamed on its own line, the error goes below it
            out.write("\n")
            out.flush()
        raise _not_found(e, session.model) from None
    finally:
        stream.close()
    text = "".join(pieces)
    if not text.endswith("\n"):
        out.write("\n")
        out.flush()
    if session.verbose and final:
        err.write(stats(final) + "\n")
        err.flush()
    return text


def run_once(client: Client, session: Session, prompt: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Answer one prompt and return 0. An empty prompt only loads the model, as `ollama run m < /dev/null` does."""
    if not prompt.strip():
        load(client, session)
        return 0
    stream_answer(client, session, [{"role": "user", "content": prompt}], out, err)
    return 0


def load(client: Client, session: Session) -> None:
    """Load the model now (an empty conversation answers done_reason "load"), so that a missing model or a
    failed load is reported before the user types anything."""
    try:
        client.request_json("POST", "/api/chat", session.body([], stream=False))
    except APIError as e:
        raise _not_found(e, session.model) from None


def _read_line(prompt: str) -> str | None:
    """One line from the user; None at end of input (Ctrl+D)."""
    try:
        return input(prompt)
    except EOFError:
        return None


def _line_buffer() -> str:
    """What was typed when Ctrl+C came, where readline can tell (empty otherwise)."""
    try:
        import readline

        return readline.get_line_buffer()
    except (ImportError, AttributeError):
        return ""


def read_message(prompt: str = ">>> ", continuation: str = "... ") -> tuple[str, bool] | None:
    """The next user input and whether it was a \"\"\" block (blocks are never /commands). None = leave."""
    line = _read_line(prompt)
    if line is None or not line.lstrip().startswith(MULTILINE):
        return None if line is None else (line, False)
    first = line.lstrip()[len(MULTILINE) :]
    if first.rstrip().endswith(MULTILINE):  # """one line"""
        return first.rstrip()[: -len(MULTILINE)], True
    lines = [first]
    while True:
        more = _read_line(continuation)
        if more is None:
            return None
        if more.rstrip().endswith(MULTILINE):
            lines.append(more.rstrip()[: -len(MULTILINE)])
            return "\n".join(lines).strip("\n"), True
        lines.append(more)


def _command(text: str, session: Session, history: list[dict[str, str]], out: TextIO) -> bool:
    """Run a /command; returns False when the session should end."""
    words = text.split()
    name = words[0].lower()
    if name in ("/bye", "/exit"):
        return False
    if name in ("/?", "/help"):
        out.write(HELP)
    elif name == "/clear":
        history.clear()
        out.write("Cleared session context\n")
    elif name == "/set" and len(words) >= 2:
        what = words[1].lower()
        if what == "parameter" and len(words) >= 4:
            key = words[2]
            # "stop" takes several sequences, as in Ollama: /set parameter stop "<|end|>" "\n\n"
            value = [parse_value(w) for w in words[3:]] if key == "stop" else parse_value(" ".join(words[3:]))
            session.options[key] = value
            shown = value if isinstance(value, str) else json.dumps(value)
            out.write(f"Set parameter '{key}' to '{shown}'\n")
        elif what == "system":
            session.system = text.split(None, 2)[2] if len(words) >= 3 else None
            out.write("Set system message.\n" if session.system else "Cleared system message.\n")
        elif what in ("verbose", "quiet"):
            session.verbose = what == "verbose"
            out.write(f"Set '{what}' mode.\n")
        else:
            out.write(SET_USAGE)
    elif name == "/set":
        out.write(SET_USAGE)
    else:
        out.write(f"Unknown command '{words[0]}'. Type /? for help\n")
    out.flush()
    return True


def interactive(client: Client, session: Session, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The `>>> ` loop. Returns 0 when the user leaves with /bye or Ctrl+D."""
    with contextlib.suppress(ImportError):  # readline is missing on Windows; input() then works without editing
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    load(client, session)
    history: list[dict[str, str]] = []
    while True:
        try:
            read = read_message()
        except KeyboardInterrupt:
            # Ctrl+C drops the line being typed; on an empty line it explains how to leave.
            out.write("\n" if _line_buffer() else "\nUse Ctrl + d or /bye to exit.\n")
            out.flush()
            continue
        if read is None:
            out.write("\n")
            return 0
        text, block = read
        if not text.strip():
            continue
        if not block and text.lstrip().startswith("/"):
            if not _command(text.strip(), session, history, out):
                return 0
            continue
        messages = [*history, {"role": "user", "content": text}]
        try:
            answer = stream_answer(client, session, messages, out, err)
        except KeyboardInterrupt:
            # The connection is already closed (see stream_answer). The exchange is dropped whole: keeping the
            # question alone would leave two user turns in a row, which strict chat templates reject.
            out.write("\n")
            out.flush()
            continue
        except APIError as e:
            err.write(f"Error: {e.message}\n")
            err.flush()
            continue
        history[:] = [*messages, {"role": "assistant", "content": answer}]
        out.write("\n")  # a blank line between an answer and the next prompt, as Ollama does
        out.flush()
