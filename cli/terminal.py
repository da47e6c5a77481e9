"""What `mgr run` does on a terminal: word wrap at its width, a spinner until the first token, reading a
message (a \"\"\" block, a bracketed paste) and the input history kept across sessions. Stdlib only.

Pasting: GNU readline (8.1 and later turn bracketed paste on) takes a pasted block as one line with its
newlines in it, so a pasted block is one message. Without readline the terminal hands the block over line by
line; its paste markers (ESC[200~ ... ESC[201~, asked for here) then tell where it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

MULTILINE = '"""'
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
HISTORY_LENGTH = 1000  # lines kept in the history file
SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # Ollama's


def is_tty(stream: Any) -> bool:
    """isatty() that tolerates replaced or closed streams (pytest's capture, a closed pipe)."""
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def terminal_width(stream: Any) -> int:
    """The terminal's columns (0 when `stream` is not a terminal: nothing to wrap to)."""
    if not is_tty(stream):
        return 0
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except OSError:
        return shutil.get_terminal_size().columns


def _cells(text: str) -> int:
    """Columns a piece of text takes on a terminal (wide East Asian characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in text)


class WordWrapper:
    """Streams text to `out`, breaking lines between words before they pass `width` columns (0 = no wrap).
    A word is held until it is complete (a space or a newline follows it, or `finish` is called), so a word
    is never split at the terminal's edge; a word longer than a line is written whole."""

    def __init__(self, out: TextIO, width: int) -> None:
        self.out = out
        self.width = width
        self.column = 0
        self._word: list[str] = []
        self._space = ""  # the blank after the last word, written only if the next word stays on this line

    def write(self, text: str) -> None:
        if not self.width:
            self.out.write(text)
            self._track(text)
            return
        for char in text:
            if char == "\n":
                self._flush_word()
                self._space = ""
                self.out.write("\n")
                self.column = 0
            elif char in " \t":
                self._flush_word()
                if self.column:
                    self._space = " "
            else:
                self._word.append(char)

    def finish(self) -> None:
        """Write the word still held (the end of the answer)."""
        self._flush_word()

    def flush(self) -> None:
        self.out.flush()

    def _flush_word(self) -> None:
        if not self._word:
            return
        word = "".join(self._word)
        self._word.clear()
        size = _cells(word)
        if self.column and self.column + len(self._space) + size > self.width:
            self.out.write("\n")  # the blank before the word becomes the line break
            self.column = 0
        elif self._space:
            self.out.write(self._space)
            self.column += 1
        self._space = ""
        self.out.write(word)
        self.column = (self.column + size) % self.width if size >= self.width else self.column + size

    def _track(self, text: str) -> None:
        line = text.rsplit("\n", 1)
        self.column = _cells(line[-1]) if len(line) > 1 else self.column + _cells(text)


class Spinner:
    """Ollama's braille spinner, drawn on `stream` (a terminal) from a thread until `stop`; nothing elsewhere."""

    def __init__(self, stream: TextIO, interval: float = 0.1) -> None:
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._drawn = False

    def start(self) -> Spinner:
        if is_tty(self.stream):
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        return self

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(0 if frame == 0 else self.interval):
            with self._lock:
                if self._stop.is_set():
                    return
                self.stream.write(SPINNER_FRAMES[frame % len(SPINNER_FRAMES)] + "\b")
                self.stream.flush()
                self._drawn = True
            frame += 1

    def stop(self) -> None:
        """Erase the spinner; safe to call more than once."""
        self._stop.set()
        with self._lock:
            if self._drawn:
                self.stream.write(" \b")
                self.stream.flush()
                self._drawn = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)


# -- reading input --------------------------------------------------------------------------------------------


def read_line(prompt: str) -> str | None:
    """One line from the user; None at end of input (Ctrl+D)."""
    try:
        return input(prompt)
    except EOFError:
        return None


def read_message(prompt: str = ">>> ", continuation: str = "... ",
                 read: Callable[[str], str | None] = read_line) -> tuple[str, bool] | None:
    """The next user input and whether it is a block (a \"\"\" block or a paste: never a /command).
    None = leave. A line with newlines in it (readline's bracketed paste) is a pasted block."""
    line = read(prompt)
    if line is None:
        return None
    if PASTE_START in line:  # without readline: the paste arrives line by line between its markers
        lines = [line]
        while PASTE_END not in lines[-1]:
            more = read("")
            if more is None:
                break
            lines.append(more)
        text = "\n".join(lines).replace(PASTE_START, "").replace(PASTE_END, "")
        return text.strip("\n"), True
    if "\n" in line:
        return line.strip("\n"), True
    if not line.lstrip().startswith(MULTILINE):
        return line, False
    first = line.lstrip()[len(MULTILINE):]
    if first.rstrip().endswith(MULTILINE):  # """one line"""
        return first.rstrip()[: -len(MULTILINE)], True
    lines = [first]
    while True:
        more = read(continuation)
        if more is None:
            return None
        if more.rstrip().endswith(MULTILINE):
            lines.append(more.rstrip()[: -len(MULTILINE)])
            return "\n".join(lines).strip("\n"), True
        lines.append(more)


def line_buffer() -> str:
    """What was typed when Ctrl+C came, where readline can tell (empty otherwise)."""
    try:
        import readline

        return readline.get_line_buffer()
    except (ImportError, AttributeError):
        return ""


class History:
    """readline's input history, read from and written back to a file (the state dir's `history`), so the
    up arrow recalls earlier sessions' lines. Without readline there is no history, and no error."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.enabled = True
        self._readline: Any = None

    def __enter__(self) -> History:
        try:
            import readline
        except ImportError:
            # no line editing: ask the terminal to mark pastes, so read_message can keep a block together
            if is_tty(sys.stdout):
                sys.stdout.write("\x1b[?2004h")
            return self
        self._readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        readline.set_auto_history(True)
        readline.clear_history()  # another session's lines (a test's, an embedding program's) are not ours
        if self.path is not None:
            with contextlib.suppress(OSError):
                readline.read_history_file(self.path)
        return self

    def set_enabled(self, enabled: bool) -> None:
        """/set history and /set nohistory: whether what is typed from now on is remembered."""
        self.enabled = enabled
        if self._readline is not None:
            self._readline.set_auto_history(enabled)

    def __exit__(self, *_: object) -> None:
        if self._readline is None or self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(self.path)
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)  # what was typed may be private


@contextlib.contextmanager
def spinning(stream: TextIO, enabled: bool) -> Iterator[Spinner]:
    spinner = Spinner(stream)
    if enabled:
        spinner.start()
    try:
        yield spinner
    finally:
        spinner.stop()
