"""`mgr run`: one-shot answers and the interactive chat, both over POST /api/chat, as `ollama run` does them.

Answers are streamed: each piece is written as it arrives, word-wrapped at the terminal's width, after a
spinner that turns until the first token (both on a terminal only). An answer must end with the daemon's
final `done` line: a stream that stops without it (the daemon stopped or died) is an error, exit 1, with the
reason on stderr. Ctrl+C during an interactive answer closes that request's connection (the daemon then stops
generating) and returns to the prompt; the cancelled exchange is dropped from the conversation. A model the
store lacks is pulled first, with the pull's progress, as `ollama run` does.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from mgr.registry.modelfile import DEPRECATED_PARAMETERS, PARAMETERS, parameter_from_text

from .client import APIError, Client, ConnectionLost
from .format import stats
from .terminal import History, WordWrapper, is_tty, line_buffer, read_message, spinning, terminal_width

HELP = '''Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use """ to begin a multi-line message; a pasted block is one message.
'''

SET_HELP = '''Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking
'''

PARAMETER_HELP = '''Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter num_gpu <int>          The number of layers to send to the GPU
  /set parameter stop <string> <string> ...   Set the stop parameters
'''

SHOW_HELP = '''Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
'''

SHORTCUTS = '''Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Alt + b             Move back (left) one word
  Alt + f             Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit (/bye)
  Up / Down           Earlier and later lines, also from earlier sessions
'''

THINK_LEVELS = ("high", "medium", "low")
CUT_OFF = "the answer was cut off before its end"


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


def parse_think(text: str) -> bool | str:
    """--think's value as Ollama takes it: true/false, or a level (high, medium, low). Raises ValueError."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on", ""):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    if lowered in THINK_LEVELS:
        return lowered
    raise ValueError(f"expected true, false, high, medium or low, got {text!r}")


def read_format(value: str | None) -> str | dict[str, Any] | None:
    """--format: "json", or a file holding a JSON schema (the answer then follows it). Raises ValueError."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    path = Path(value).expanduser()
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"expected json or a JSON schema file, and {value} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{value} is not a JSON schema file ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{value} holds no JSON schema (a JSON object)")
    return schema


def parameter(key: str, words: list[str]) -> Any:
    """A `/set parameter` value typed as the option is (Modelfile PARAMETER rules). Raises ValueError,
    also for a parameter Ollama does not know."""
    if key not in PARAMETERS and key not in DEPRECATED_PARAMETERS:
        raise ValueError(f"unknown parameter '{key}'")
    if key == "stop":  # several sequences, as in Ollama: /set parameter stop "<|end|>" "\n\n"
        return [str(parse_value(w)) if w.startswith('"') else w for w in words]
    return parameter_from_text(key, " ".join(words))


@dataclasses.dataclass
class Session:
    """What every chat request of one `mgr run` carries besides the messages, and the conversation."""

    model: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    system: str | None = None
    keep_alive: float | int | None = None  # seconds; None = the daemon's default
    format: str | dict[str, Any] | None = None
    verbose: bool = False
    think: bool | str | None = None  # None = the model's default
    hide_thinking: bool = False
    wordwrap: bool = True
    insecure: bool = False  # passed on to a pull
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def body(self, messages: list[dict[str, str]], stream: bool = True) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": system + messages, "stream": stream}
        if self.options:
            body["options"] = self.options
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        if self.format:
            body["format"] = self.format
        if self.think is not None and messages:
            body["think"] = self.think
        return body


def _missing(error: APIError) -> bool:
    return error.status == 404


class Answer:
    """Writes one streamed answer: the thinking (unless hidden) as Ollama shows it, then the content, both
    word-wrapped; counts what was written, so an error goes on its own line."""

    def __init__(self, out: TextIO, width: int, hide_thinking: bool) -> None:
        self.writer = WordWrapper(out, width)
        self.hide_thinking = hide_thinking
        self.out = out
        self.thinking = False
        self.pieces: list[str] = []
        self.written = False

    def add(self, message: dict[str, Any]) -> None:
        thought = message.get("thinking") or ""
        piece = message.get("content") or ""
        if thought and not self.hide_thinking:
            if not self.thinking:
                self.thinking = True
                self.writer.write("Thinking...\n")
            self.writer.write(thought)
        if piece:
            if self.thinking:
                self.thinking = False
                self.writer.finish()
                self.writer.write("\n...done thinking.\n\n")
            self.pieces.append(piece)
            self.writer.write(piece)
        if thought or piece:
            self.written = True
            self.writer.flush()

    def end(self) -> str:
        self.writer.finish()
        text = "".join(self.pieces)
        if self.written and self.writer.column:
            self.out.write("\n")
        self.out.flush()
        return text


def stream_answer(client: Client, session: Session, messages: list[dict[str, str]], out: TextIO,
                  err: TextIO) -> str:
    """Stream one answer to `out` and return its text. The connection is closed on any exit, so a
    KeyboardInterrupt raised while waiting for the next piece cancels the generation on the daemon.
    Raises APIError; a stream without its final line is one too (ConnectionLost)."""
    terminal = is_tty(out)
    answer = Answer(out, terminal_width(out) if session.wordwrap else 0, session.hide_thinking)
    final: dict[str, Any] = {}
    with spinning(out, terminal) as spinner:
        stream = client.stream_ndjson("POST", "/api/chat", session.body(messages))
        try:
            for chunk in stream:
                message = chunk.get("message") or {}
                if message.get("content") or message.get("thinking"):
                    spinner.stop()
                answer.add(message)
                if chunk.get("done"):
                    final = chunk
        except ConnectionLost as e:
            spinner.stop()
            answer.end()
            raise ConnectionLost(f"{CUT_OFF}: {e.message}") from None
        except APIError:
            spinner.stop()
            answer.end()  # keep what was streamed on its own line, the error goes below it
            raise
        finally:
            stream.close()
    text = answer.end()
    if not final:
        raise ConnectionLost(f"{CUT_OFF}: mgr at {client.base_url} closed the stream without its final line "
                             "(was the daemon stopped?)")
    if not answer.written:
        out.write("\n")
    if session.verbose:
        err.write(stats(final) + "\n")
        err.flush()
    return text


def pull_missing(client: Client, session: Session, err: TextIO) -> None:
    """`ollama run` pulls a model it does not have: so does `mgr run`, showing the pull's progress on stderr
    (stdout keeps only the answer)."""
    from .pull import pull_model  # rich, for the bars: only when a pull happens

    try:
        code = pull_model(client, session.model, insecure=session.insecure, tty=is_tty(err), out=err, err=err)
    except APIError as e:
        raise APIError(f'model "{session.model}" not found, and pulling it failed: {e.message}', e.status) from None
    if code:
        raise KeyboardInterrupt  # the pull was interrupted (it said how to resume)


def run_once(client: Client, session: Session, prompt: str, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
    """Answer one prompt and return 0. An empty prompt only loads the model, as `ollama run m < /dev/null` does."""
    for attempt in (1, 2):
        try:
            if not prompt.strip():
                load(client, session)
            else:
                stream_answer(client, session, [{"role": "user", "content": prompt}], out, err)
            return 0
        except APIError as e:
            if attempt == 2 or not _missing(e):
                raise
            pull_missing(client, session, err)
    return 0


def load(client: Client, session: Session) -> None:
    """Load the model now (an empty conversation answers done_reason "load"), so that a missing model or a
    failed load is reported before the user types anything."""
    client.request_json("POST", "/api/chat", session.body([], stream=False), wait=True)


def _load_or_pull(client: Client, session: Session, out: TextIO, err: TextIO) -> None:
    try:
        with spinning(out, is_tty(out)):
            load(client, session)
    except APIError as e:
        if not _missing(e):
            raise
        pull_missing(client, session, err)
        with spinning(out, is_tty(out)):
            load(client, session)


class Commands:
    """The /commands of the chat, as Ollama's."""

    def __init__(self, client: Client, session: Session, history: History, out: TextIO) -> None:
        self.client = client
        self.session = session
        self.history = history
        self.out = out

    def run(self, text: str) -> bool:
        """Run a /command; returns False when the session should end."""
        words = text.split()
        name = words[0].lower()
        if name in ("/bye", "/exit"):
            return False
        try:
            if name in ("/?", "/help"):
                self.out.write(self._help(words[1:]))
            elif name == "/clear":
                self.session.messages.clear()
                self.out.write("Cleared session context\n")
            elif name == "/set":
                self._set(text, words[1:])
            elif name == "/show":
                self._show(words[1:])
            elif name == "/save":
                self._save(words[1:])
            elif name == "/load":
                self._load(words[1:])
            else:
                self.out.write(f"Unknown command '{words[0]}'. Type /? for help\n")
        except APIError as e:
            self.out.write(f"Error: {e.message}\n")
        self.out.flush()
        return True

    @staticmethod
    def _help(topic: list[str]) -> str:
        if topic and topic[0] in ("shortcuts", "shortcut"):
            return SHORTCUTS
        if topic and topic[0] == "set":
            return SET_HELP
        if topic and topic[0] == "show":
            return SHOW_HELP
        return HELP

    def _set(self, text: str, words: list[str]) -> None:
        session, out = self.session, self.out
        what = words[0].lower() if words else ""
        if what == "parameter":
            if len(words) < 3:
                out.write(PARAMETER_HELP)
                return
            key = words[1]
            try:
                value = parameter(key, words[2:])
            except ValueError as e:
                out.write(f"Couldn't set parameter: {e}\n")
                return
            if key in DEPRECATED_PARAMETERS:
                out.write(f"Parameter '{key}' is no longer used; it is ignored.\n")
                return
            session.options[key] = value
            shown = value if isinstance(value, str) else json.dumps(value)
            out.write(f"Set parameter '{key}' to '{shown}'\n")
        elif what == "system":
            session.system = text.split(None, 2)[2].strip().strip('"') if len(words) >= 2 else None
            out.write("Set system message.\n" if session.system else "Cleared system message.\n")
        elif what in ("verbose", "quiet"):
            session.verbose = what == "verbose"
            out.write(f"Set '{what}' mode.\n")
        elif what in ("wordwrap", "nowordwrap"):
            session.wordwrap = what == "wordwrap"
            out.write("Set 'wordwrap' mode.\n" if session.wordwrap else "Set 'nowordwrap' mode.\n")
        elif what in ("history", "nohistory"):
            self.history.set_enabled(what == "history")
            out.write(f"Set '{what}' mode.\n")
        elif what == "format" and words[1:] == ["json"]:
            session.format = "json"
            out.write("Set format to 'json' mode.\n")
        elif what == "noformat":
            session.format = None
            out.write("Disabled format.\n")
        elif what in ("think", "nothink"):
            level = words[1].lower() if what == "think" and len(words) > 1 else None
            if level is not None and level not in THINK_LEVELS:
                out.write(f"Invalid think level '{words[1]}': use high, medium or low\n")
                return
            session.think = level or (what == "think")
            out.write(f"Set 'think' mode{' to ' + repr(level) if level else ''}.\n" if session.think
                      else "Set 'nothink' mode.\n")
        else:
            if what:
                out.write(f"Unknown command '/set {words[0]}'. Type /? set for help\n")
            out.write(SET_HELP)

    def _show(self, words: list[str]) -> None:
        from .show import format_show

        what = words[0].lower() if words else "info"
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            self.out.write(f"Unknown command '/show {words[0]}'. Type /? show for help\n")
            return
        info = self.client.request_json("POST", "/api/show", {"model": self.session.model})
        if what == "info":
            self.out.write(format_show(info) + "\n")
            return
        if what == "system" and self.session.system:
            text = self.session.system
        elif what == "parameters" and self.session.options:
            shown = {**(info.get("parameters_map") or {}), **self.session.options}
            text = "\n".join(f"{key:<30} {json.dumps(value)}" for key, value in shown.items())
        else:
            text = str(info.get(what) or "")
        if not text.strip():
            text = f"No {what} was specified for this model."
        self.out.write(text.rstrip("\n") + "\n")

    def _save(self, words: list[str]) -> None:
        if len(words) != 1:
            self.out.write("Usage:\n  /save <modelname>\n")
            return
        request: dict[str, Any] = {"model": words[0], "from": self.session.model, "stream": False}
        if self.session.messages:
            request["messages"] = self.session.messages
        if self.session.system:
            request["system"] = self.session.system
        if self.session.options:
            request["parameters"] = self.session.options
        self.client.request_json("POST", "/api/create", request, wait=True)
        self.out.write(f"Created new model '{words[0]}'\n")

    def _load(self, words: list[str]) -> None:
        if len(words) != 1:
            self.out.write("Usage:\n  /load <modelname>\n")
            return
        previous = self.session.model
        self.session.model = words[0]
        self.out.write(f"Loading model '{words[0]}'\n")
        self.out.flush()
        try:
            with spinning(self.out, is_tty(self.out)):
                load(self.client, self.session)
        except APIError:
            self.session.model = previous
            raise
        # a saved session's conversation is in the model (its MESSAGE lines): the daemon puts it before ours
        self.session.messages.clear()


def interactive(client: Client, session: Session, history_file: Path | None = None, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr) -> int:
    """The `>>> ` loop. Returns 0 when the user leaves with /bye or Ctrl+D."""
    _load_or_pull(client, session, out, err)
    with History(history_file) as history:
        commands = Commands(client, session, history, out)
        while True:
            try:
                read = read_message()
            except KeyboardInterrupt:
                # Ctrl+C drops the line being typed; on an empty line it explains how to leave.
                out.write("\n" if line_buffer() else "\nUse Ctrl + d or /bye to exit.\n")
                out.flush()
                continue
            if read is None:
                out.write("\n")
                return 0
            text, block = read
            if not text.strip():
                continue
            if not block and text.lstrip().startswith("/"):
                if not commands.run(text.strip()):
                    return 0
                continue
            messages = [*session.messages, {"role": "user", "content": text}]
            try:
                answer = stream_answer(client, session, messages, out, err)
            except KeyboardInterrupt:
                # The connection is already closed (see stream_answer). The exchange is dropped whole: keeping
                # the question alone would leave two user turns in a row, which strict chat templates reject.
                out.write("\n")
                out.flush()
                continue
            except APIError as e:
                err.write(f"Error: {e.message}\n")
                err.flush()
                continue
            session.messages[:] = [*messages, {"role": "assistant", "content": answer}]
            out.write("\n")  # a blank line between an answer and the next prompt, as Ollama does
            out.flush()
