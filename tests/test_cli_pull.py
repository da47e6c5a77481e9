"""`mgr pull`, `mgr show` and `mgr cp` against a scripted stand-in daemon (a stdlib HTTP server in a thread),
plus the pure parts of pull: speed, ETA, the progress text and the plain (non-terminal) rendering."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mgr.cli.client import Client
from mgr.cli.main import main
from mgr.cli.pull import PlainRenderer, PullTally, RateMeter, format_eta, progress_text, pull_model, summary

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def file_event(digest: str, total: int, completed: int) -> dict[str, Any]:
    return {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": completed}


PULL_EVENTS: list[dict[str, Any]] = [
    {"status": "pulling manifest"},
    {"status": "source hf unreachable, trying hf-mirror"},
    {"status": "pulling from hf-mirror (https://hf-mirror.com): org/repo@0123456789ab", "source": "hf-mirror"},
    file_event(A, 2_000_000_000, 500_000_000),  # resumed: half a gigabyte was already there
    file_event(B, 4_000, 0),
    file_event(A, 2_000_000_000, 1_000_000_000),
    file_event(B, 4_000, 4_000),
    file_event(A, 2_000_000_000, 1_500_000_000),
    file_event(A, 2_000_000_000, 2_000_000_000),
    file_event(A, 2_000_000_000, 2_000_000_000),  # a repeated last event must not print twice
    {"status": "verifying sha256 digest"},
    {"status": "writing manifest"},
    {"status": "success"},
]


# -- pure parts ---------------------------------------------------------------------------------------------


def render_plain(events: list[dict[str, Any]]) -> list[str]:
    """All the plain lines for a sequence of events (what a non-terminal run prints, summary aside)."""
    renderer = PlainRenderer()
    return [line for event in events for line in renderer.lines(event)]



def test_rate_meter_measures_over_its_window() -> None:
    meter = RateMeter(window=5.0)
    assert meter.rate() == 0.0
    meter.add(0.0, 0)
    meter.add(1.0, 10_000_000)
    assert meter.rate() == 10_000_000
    for t in range(2, 21):  # the speed rises to 20 MB/s; the old, slow samples leave the window
        meter.add(float(t), 10_000_000 + (t - 1) * 20_000_000)
    assert meter.rate() == pytest.approx(20_000_000)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, ""), (float("inf"), ""), (-1, ""), (0.4, "0s"), (45, "45s"), (130, "2m10s"), (3723, "1h2m3s")],
)
def test_eta_is_written_like_ollama(seconds: float | None, text: str) -> None:
    assert format_eta(seconds) == text


def test_progress_text() -> None:
    assert progress_text(420_000_000, 1_200_000_000, 35_000_000) == "420 MB/1.2 GB  35 MB/s  22s"
    assert progress_text(0, 1_200_000_000, 0.0) == "0 B/1.2 GB"  # no speed yet: no speed and no ETA
    assert progress_text(1_200_000_000, 1_200_000_000, 35_000_000) == "1.2 GB/1.2 GB"  # done: nothing left


def test_plain_rendering_prints_changes_only() -> None:
    assert render_plain(PULL_EVENTS) == [
        "pulling manifest",
        "source hf unreachable, trying hf-mirror",
        "pulling from hf-mirror (https://hf-mirror.com): org/repo@0123456789ab",
        "pulling aaaaaaaaaaaa: 2 GB",
        "pulling bbbbbbbbbbbb: 4 KB",
        "pulled bbbbbbbbbbbb (4 KB)",
        "pulled aaaaaaaaaaaa (2 GB)",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]


def test_plain_rendering_of_a_file_that_arrives_complete() -> None:
    # A blob the store already holds (or a small file whose digest is known only once fetched) shows up done.
    assert render_plain([file_event(A, 1_000, 1_000), {"status": "success"}, {"status": "success"}]) == [
        "pulling aaaaaaaaaaaa: 1 KB",
        "pulled aaaaaaaaaaaa (1 KB)",
        "success",
    ]


def test_summary_counts_only_the_bytes_this_run_fetched() -> None:
    tally = PullTally()
    for event in PULL_EVENTS:
        tally.add(event)
    assert tally.succeeded and tally.size == 2_000_004_000
    assert tally.transferred == 1_500_004_000
    assert summary("org/repo", tally, 10.0) == "pulled org/repo (2.0 GB, 2 files) in 10.0s (150.0 MB/s)"
    one = PullTally()
    one.add(file_event(A, 1_000, 1_000))
    assert summary("m", one, 0.0) == "m is up to date (1 KB, 1 file, nothing to download)"


# -- against a stand-in daemon --------------------------------------------------------------------------------


class FakeDaemon:
    """Answers each path with a scripted (status, NDJSON lines); records the request bodies."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                daemon.requests.append((self.path, body))
                status, lines = daemon.routes.get(self.path, (404, [{"error": "no such route"}]))
                self.send_response(status)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                for line in lines:
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()

            def do_GET(self) -> None:  # the CLI's ping before a long call
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"version": "0.12.0"}')

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    monkeypatch.setenv("MGR_HOST", f"127.0.0.1:{fake.port}")
    monkeypatch.setenv("MGR_CONFIG", str(tmp_path / "absent.toml"))
    yield fake
    fake.close()


def test_pull_prints_plain_lines_and_a_summary(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.routes["/api/pull"] = (200, PULL_EVENTS)
    assert main(["pull", "hf.co/org/repo:Q4_K_M"]) == 0
    assert daemon.requests == [("/api/pull", {"model": "hf.co/org/repo:Q4_K_M", "stream": True})]
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == render_plain(PULL_EVENTS)
    assert lines[-1].startswith("pulled hf.co/org/repo:Q4_K_M (2.0 GB, 2 files) in ")


def test_pull_insecure_is_passed_on(daemon: FakeDaemon) -> None:
    daemon.routes["/api/pull"] = (200, [{"status": "success"}])
    assert main(["pull", "--insecure", "m"]) == 0
    assert daemon.requests[0][1] == {"model": "m", "stream": True, "insecure": True}


@pytest.mark.parametrize(
    ("status", "lines", "message"),
    [
        (404, [{"error": 'repo "org/nope" not found on hf'}], 'Error: repo "org/nope" not found on hf'),
        (200, [{"status": "pulling manifest"}, {"error": "disk full"}], "Error: disk full"),
        (200, [{"status": "pulling manifest"}], "Error: the pull stopped before it finished (the daemon ended the "
         "stream without its last line); what was fetched is kept: run the same command again to resume"),
        (500, [{"error": "no source could serve it: hf (https://huggingface.co) is unreachable: ConnectError: "
                         "[Errno -2] Name or service not known\nmore\nlines"}],
         "Error: cannot reach huggingface.co from the daemon (offline, or a proxy needed?): set MGR_HF_ENDPOINT "
         "to a mirror or MGR_SOURCES to the hubs it can reach where `mgr serve` runs, or put a file there "
         "yourself: mgr create NAME --from FILE.gguf"),
    ],
)
def test_pull_failures_exit_1(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], status: int, lines: list[dict[str, Any]], message: str
) -> None:
    daemon.routes["/api/pull"] = (status, lines)
    assert main(["pull", "org/nope"]) == 1
    assert capsys.readouterr().err.strip() == message


class InterruptingOutput(io.StringIO):
    """Stands for Ctrl+C pressed while the first file downloads."""

    def write(self, text: str) -> int:
        if text.startswith("pulling aaaa"):
            raise KeyboardInterrupt
        return super().write(text)


def test_pull_interrupted_exits_130_and_says_how_to_resume(daemon: FakeDaemon) -> None:
    daemon.routes["/api/pull"] = (200, PULL_EVENTS)
    out, err = InterruptingOutput(), io.StringIO()
    assert pull_model(Client(f"http://127.0.0.1:{daemon.port}"), "m", out=out, err=err) == 130
    assert err.getvalue() == "interrupted; run the same command again to resume\n"


def test_pull_with_bars_finishes_with_the_summary(daemon: FakeDaemon) -> None:
    daemon.routes["/api/pull"] = (200, PULL_EVENTS)
    out = io.StringIO()
    assert pull_model(Client(f"http://127.0.0.1:{daemon.port}"), "m", tty=True, out=out) == 0
    text = out.getvalue()
    assert "pulling aaaaaaaaaaaa" in text and "writing manifest" in text
    assert text.splitlines()[-1].startswith("pulled m (2.0 GB, 2 files) in ")


def test_pull_without_a_daemon_says_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    daemon = FakeDaemon()
    port = daemon.port
    daemon.close()  # nothing listens there any more
    monkeypatch.setenv("MGR_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("MGR_CONFIG", str(tmp_path / "absent.toml"))
    assert main(["pull", "m"]) == 1
    assert "Start it with `mgr serve --detach`" in capsys.readouterr().err


SHOW = {
    "template": "{{ .Prompt }}",
    "files": [{"path": "m.gguf", "digest": A, "size": 2_000_000_000}],
    "details": {"format": "gguf"},
}


def test_show_template_and_files(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.routes["/api/show"] = (200, [SHOW])
    assert main(["show", "m", "--template"]) == 0
    assert capsys.readouterr().out == "{{ .Prompt }}\n"
    assert main(["show", "m", "--files"]) == 0
    assert capsys.readouterr().out == "m.gguf   2 GB   aaaaaaaaaaaa\n"
    assert daemon.requests[0] == ("/api/show", {"model": "m"})
    daemon.routes["/api/show"] = (404, [{"error": "model 'x' not found"}])
    assert main(["show", "x"]) == 1
    assert capsys.readouterr().err.strip() == "Error: model 'x' not found"


def test_cp(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.routes["/api/copy"] = (200, [{}])
    assert main(["cp", "a:latest", "b"]) == 0
    assert daemon.requests == [("/api/copy", {"source": "a:latest", "destination": "b"})]
    assert capsys.readouterr().out == "copied 'a:latest' to 'b'\n"
