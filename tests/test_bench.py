"""`mgr bench` against the real llama.cpp runner through a real daemon: a small sweep through both APIs (the table's
fields, the JSON, the plots (SVG, HTML, PNG), the server's own CPU time), `--target` against a second `mgr serve`,
the live progress on a terminal, a load generator that cannot keep up saying so (against a server that answers at
once), and the errors a user can make. Also the Ollama API's byte-level fast path (api/ollama.py), which must render
exactly what the parsed path renders. Not a timed test: the numbers are checked for being consistent, not fast
(tests/bench/bench_cli.py compares them with tests/bench/bench_gguf.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pexpect
import psutil
import pytest
from conftest import Daemon
from test_metrics import scrape, value
from test_terminal import spawn

from mgr.cli.bench import server_cpu_seconds

pytestmark = pytest.mark.slow

FIELDS = ("request_throughput", "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms",
          "completed", "errors", "duration", "client_cpu", "saturated")


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    """Another `mgr serve` with the same model under another name: the server --target measures."""
    d = Daemon(tmp_path_factory.mktemp("second"), {"MGR_NUM_PARALLEL": "2"})
    d.start()
    created = d.cli("create", "other", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    yield d
    d.stop()


@pytest.fixture(scope="module")
def two_slots(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("bench"), {"MGR_NUM_PARALLEL": "2"})
    d.start()
    created = d.cli("create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    yield d
    d.stop()


def test_a_sweep_through_both_apis_with_a_target_json_and_plots(two_slots: Daemon, second: Daemon,
                                                                  tmp_path: Path) -> None:
    report, svg, page = tmp_path / "bench.json", tmp_path / "bench.svg", tmp_path / "bench.html"
    answered = requests_answered(two_slots)
    run = two_slots.cli("bench", "smollm2", "--concurrency", "1,2", "--num-prompts", "2", "--input-len", "16",
                        "--output-len", "12", "--api", "ollama,openai", "--target", f"second={second.base_url}",
                        "--json", str(report), "--plot", str(svg), timeout=600)
    assert run.returncode == 0, run.stderr
    # the live lines name every cell; the table has vLLM's fields
    for needle in ("warming up mgr smollm2 (ollama)", "warming up second other:latest (openai)",
                   "warming up mgr smollm2 (ollama) at 2 streams", "warming up second other:latest (openai) at 2 "
                   "streams", "mgr smollm2 ollama c=1:", "second other:latest openai c=2:"):
        assert needle in run.stderr, run.stderr
    # per API: the warm-up request, the warm-up round at the highest concurrency (2), then 2 cells of 2
    assert requests_answered(two_slots) - answered == 2 * (1 + 2 + 2 * 2)
    header = run.stdout.splitlines()[0].split()
    for column in ("SERVER", "MODEL", "API", "CONC", "REQ/S", "TTFT", "ITL", "P50", "P90", "P99", "ERR"):
        assert column in header, run.stdout
    rows = [line.split() for line in run.stdout.splitlines()[1:] if line.startswith(("mgr ", "second "))]
    # mgr and the target alternate, cell by cell: concurrency, then API, then server
    assert [(r[0], r[2], r[3]) for r in rows] == [
        (server, api, c) for c in ("1", "2") for api in ("ollama", "openai") for server in ("mgr", "second")]

    cells = json.loads(report.read_text())["cells"]
    assert len(cells) == 8
    for cell in cells:
        for field in FIELDS:
            assert field in cell, field
        assert cell["errors"] == 0 and cell["completed"] == 2, cell
        # ignore_eos through both APIs: every answer has exactly --output-len tokens, as its server counted
        assert cell["total_output_tokens"] == 2 * 12, cell
        assert cell["total_input_tokens"] > 2 * 16  # the prompt and the chat template
        assert cell["output_throughput"] == pytest.approx(24 / cell["duration"])
        assert cell["request_throughput"] == pytest.approx(2 / cell["duration"])
        ttft, itl = cell["ttft_ms"], cell["itl_ms"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] and ttft["mean"] > 0
        assert 0 <= itl["p50"] <= itl["p90"] <= itl["p99"]
        assert ttft["mean"] < cell["duration"] * 1000
        assert cell["model"] == ("smollm2" if cell["server"] == "mgr" else "other:latest")  # the target's only model
        assert not cell["saturated"] or cell["client_cpu"] >= 0.85 or cell["client_lag_ms"] > 5
        # both servers are mgr daemons: their own CPU time over the cell, read from their /metrics
        assert cell["server_cpu"] is not None and 0 <= cell["server_cpu"] <= (os.cpu_count() or 1), cell

    tree = ET.fromstring(svg.read_text())
    lines = tree.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 * 4  # two panels, a line per server and API
    assert "second other:latest openai" in svg.read_text()

    again = two_slots.cli("bench", "smollm2", "-c", "1", "-n", "1", "--output-len", "4", "--plot", str(page))
    assert again.returncode == 0, again.stderr
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "<table>" in html and "<script" not in html


def test_on_a_terminal_a_cell_shows_live_progress_then_its_summary(two_slots: Daemon) -> None:
    child = spawn(two_slots, "bench", "smollm2", "-c", "2", "-n", "12", "--output-len", "48", "--api", "ollama",
                  columns=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    output = child.before
    # the line is rewritten in place (carriage return, erase line) while the cell runs, counting its requests
    counts = [int(done) for done in re.findall(r"\r\x1b\[Kmgr smollm2 ollama c=2: (\d+)/12 requests, [\d,]+ tok/s, "
                                                r"[\d.]+ s", output)]
    assert len(set(counts)) >= 2 and counts == sorted(counts), output
    # then the same line becomes the cell's summary, and the table follows on stdout
    assert re.search(r"\r\x1b\[Kmgr smollm2 ollama c=2: [\d,.]+ tok/s, [\d.]+ req/s, TTFT p50", output), output
    assert re.search(r"^mgr\s+smollm2\s+ollama\s+2\s+12\s+0\s", output, re.MULTILINE), output


@pytest.fixture
def firehose() -> Iterator[str]:
    """An OpenAI-API server that answers every chat request at once with 2,000 token events in one write: only
    the client has work to do, so a load generator of one process cannot keep up with it."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":2000}}\n\ndata: [DONE]\n\n'
    body = event * 2000 + usage
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)) + body
    missing = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                writer.write(answer if head.startswith(b"POST ") else missing)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


def test_a_load_generator_that_cannot_keep_up_says_so(two_slots: Daemon, firehose: str, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    run = two_slots.cli("bench", "x", "--no-mgr", "--target", f"{firehose}#m", "--api", "openai", "-c", "16",
                        "-n", "64", "--processes", "1", "--json", str(report), timeout=300)
    assert run.returncode == 0, run.stderr
    [cell] = json.loads(report.read_text())["cells"]
    assert cell["errors"] == 0 and cell["total_output_tokens"] == 64 * 2000, cell
    assert cell["saturated"] and (cell["client_cpu"] >= 0.85 or cell["client_lag_ms"] > 5), cell
    assert "the load generator saturated (busiest process" in run.stderr and "use --processes 2" in run.stderr, \
        run.stderr


def test_several_models_side_by_side(two_slots: Daemon, gguf_path: Path, tmp_path: Path) -> None:
    created = two_slots.cli("create", "smollm2-copy", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    report, svg = tmp_path / "bench.json", tmp_path / "bench.svg"
    try:
        run = two_slots.cli("bench", "smollm2", "smollm2-copy", "-c", "1,2", "-n", "2", "--output-len", "4",
                            "--api", "ollama", "--json", str(report), "--plot", str(svg), timeout=600)
    finally:
        two_slots.cli("rm", "smollm2-copy")
    assert run.returncode == 0, run.stderr
    cells = json.loads(report.read_text())["cells"]
    assert sorted((c["model"], c["concurrency"]) for c in cells) == [
        ("smollm2", 1), ("smollm2", 2), ("smollm2-copy", 1), ("smollm2-copy", 2)]
    assert all(c["errors"] == 0 and c["total_output_tokens"] == 2 * 4 for c in cells), cells
    rows = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("mgr ")]
    assert sorted(rows) == ["smollm2", "smollm2", "smollm2-copy", "smollm2-copy"], run.stdout
    drawn = ET.fromstring(svg.read_text())
    assert len(drawn.findall(".//{http://www.w3.org/2000/svg}polyline")) == 2 * 2  # two panels, a line per model
    assert "mgr smollm2 ollama" in svg.read_text() and "mgr smollm2-copy ollama" in svg.read_text()


def test_a_png_plot_draws_a_line_per_server_and_api(two_slots: Daemon, second: Daemon, tmp_path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    image = tmp_path / "bench.png"
    run = two_slots.cli("bench", "smollm2", "-c", "1,2", "-n", "2", "--output-len", "4", "--api", "ollama,openai",
                        "--target", f"second={second.base_url}", "--plot", str(image), timeout=600)
    assert run.returncode == 0, run.stderr
    with Image.open(image) as png:
        assert png.format == "PNG" and png.size == (1100, 400)  # two panels, 11 x 4 inches at 100 dpi
        colours = {colour for _, colour in png.convert("RGB").getcolors(maxcolors=1 << 20) or []}
    # four lines (mgr and second, each through both APIs): matplotlib's first four colours, C0-C3, are drawn
    for line in ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)):
        assert line in colours, line


def test_a_png_plot_without_matplotlib_is_one_error_line(two_slots: Daemon, tmp_path: Path) -> None:
    # a matplotlib that cannot be imported, ahead of the installed one on the path
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join(filter(None, (str(tmp_path), two_slots.env.get("PYTHONPATH"))))
    run = subprocess.run([sys.executable, "-m", "mgr.cli", "bench", "smollm2", "--plot", str(tmp_path / "b.png")],
                         env={**two_slots.env, "PYTHONPATH": path}, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 1 and "--plot FILE.png needs matplotlib" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "b.png").exists()


def requests_answered(daemon: Daemon) -> float:
    """Chat requests the daemon answered with 200 (from its /metrics)."""
    samples = scrape(daemon)
    return sum(value(samples, "mgr_requests_total", model="smollm2:latest", endpoint=endpoint, status="200")
               for endpoint in ("/api/chat", "/v1/chat/completions"))


def test_the_servers_cpu_time_is_the_daemon_process_own(two_slots: Daemon) -> None:
    assert two_slots.process is not None
    daemon = psutil.Process(two_slots.process.pid)

    def cpu() -> float:
        times = daemon.cpu_times()
        return times.user + times.system

    before = cpu()
    read = server_cpu_seconds(two_slots.base_url, ())
    after = cpu()
    assert read is not None and before - 0.02 <= read <= after + 0.02, (before, read, after)
    assert server_cpu_seconds("http://127.0.0.1:9", ()) is None  # nothing there


def access_apis(daemon: Daemon, since: int) -> list[str]:
    """The API of every chat request the daemon answered, in the order they ended (its access log, from byte
    `since`)."""
    log = daemon.log_path.read_bytes()[since:].decode(errors="replace")
    return re.findall(r"mgr\.access: POST (?:/api/chat|/v1/chat/completions) 200 api=(\w+)", log)


def test_together_interleaves_a_concurrencys_cells_through_the_same_streams(two_slots: Daemon, second: Daemon,
                                                                             tmp_path: Path) -> None:
    """--together: both APIs' cells and the target's run as one, their requests taking turns through the same 2
    streams (what the daemon's access log shows: its two APIs' requests mixed, where cells one after the other
    end every /api/chat request before the first /v1/chat/completions one)."""
    args = ("bench", "smollm2", "-c", "2", "-n", "4", "--input-len", "8", "--output-len", "8",
            "--api", "ollama,openai", "--target", f"second={second.base_url}")
    since = two_slots.log_path.stat().st_size
    apart = two_slots.cli(*args, "--json", str(tmp_path / "apart.json"), timeout=300)
    assert apart.returncode == 0, apart.stderr
    timed = access_apis(two_slots, since)[-8:]  # after the warm-ups: the two cells of 4
    assert timed == ["ollama"] * 4 + ["openai"] * 4, timed
    cells = json.loads((tmp_path / "apart.json").read_text())["cells"]
    for before, after in zip(cells, cells[1:], strict=False):  # each cell starts after the one before it ended
        assert after["started"] >= before["started"] + before["duration"], (before, after)

    report = tmp_path / "together.json"
    since = two_slots.log_path.stat().st_size
    run = two_slots.cli(*args, "--together", "--json", str(report), timeout=300)
    assert run.returncode == 0, run.stderr
    timed = access_apis(two_slots, since)[-8:]
    assert sorted(timed) == ["ollama"] * 4 + ["openai"] * 4 and timed.index("openai") < 4, timed
    for needle in ("mgr smollm2 ollama c=2:", "second other:latest ollama c=2:", "mgr smollm2 openai c=2:",
                   "second other:latest openai c=2:"):  # each cell's own line still
        assert needle in run.stderr, run.stderr
    assert "--together: the cells of a concurrency ran as one" in run.stdout, run.stdout
    written = json.loads(report.read_text())
    assert written["together"] is True
    cells = written["cells"]
    assert [(c["server"], c["api"]) for c in cells] == [
        (server, api) for api in ("ollama", "openai") for server in ("mgr", "second")]
    assert len({c["started"] for c in cells}) == 1 and len({c["duration"] for c in cells}) == 1, cells
    for cell in cells:
        assert cell["together"] is True and cell["errors"] == 0 and cell["completed"] == 4, cell
        assert cell["total_output_tokens"] == 4 * 8 and cell["concurrency"] == 2
        assert 0 < cell["ttft_ms"]["p50"] < cell["e2el_ms"]["p50"] < cell["duration"] * 1000
    # the daemon's CPU over the common run is one number, shared by its cells
    assert cells[0]["server_cpu"] is not None and cells[0]["server_cpu"] == cells[2]["server_cpu"]


def test_a_completion_is_the_same_raw_prompt_through_both_apis(two_slots: Daemon, tmp_path: Path) -> None:
    """--endpoint completion sends /api/generate raw, as /v1/completions takes its prompt: both reach the engine
    as the same tokens (without raw, Ollama's API would wrap the prompt in the chat template, more work)."""
    report = tmp_path / "completion.json"
    run = two_slots.cli("bench", "smollm2", "-c", "1", "-n", "2", "--input-len", "16", "--output-len", "4",
                        "--api", "ollama,openai", "--endpoint", "completion", "--json", str(report), timeout=300)
    assert run.returncode == 0, run.stderr
    cells = {cell["api"]: cell for cell in json.loads(report.read_text())["cells"]}
    assert cells["ollama"]["errors"] == cells["openai"]["errors"] == 0, cells
    assert cells["ollama"]["total_input_tokens"] == cells["openai"]["total_input_tokens"], cells
    assert 2 * 16 <= cells["openai"]["total_input_tokens"] < 2 * 24  # about --input-len each, no template
    assert cells["ollama"]["total_output_tokens"] == cells["openai"]["total_output_tokens"] == 2 * 4


def test_a_dataset_and_a_request_rate(two_slots: Daemon, tmp_path: Path) -> None:
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Tell me about the sea and its tides, please."},
                           {"from": "gpt", "value": "The sea moves with the moon, twice a day."}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "too short to keep"}]},
    ]))
    report = tmp_path / "rate.json"
    run = two_slots.cli("bench", "smollm2", "-c", "2", "-n", "3", "--dataset", str(dataset), "--request-rate", "50",
                        "--api", "openai", "--endpoint", "completion", "--temperature", "0", "-o", "top_k=1",
                        "-o", "repeat_penalty=1.0", "--json", str(report), timeout=300)
    assert run.returncode == 0, run.stderr
    written = json.loads(report.read_text())
    assert written["sampling"] == {"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0}
    [cell] = written["cells"]
    assert cell["request_rate"] == 50 and cell["completed"] == 3 and cell["errors"] == 0
    # the answer's length in tokens estimated from its text (41 characters / 4), ignore_eos on
    assert cell["total_output_tokens"] == 3 * 10


@pytest.mark.parametrize(("args", "message"), [
    (["nope"], 'mgr: the warm-up request to nope failed: HTTP 404: model "nope" not found'),
    (["smollm2", "--plot", "out.jpg"], "the file must end in .svg, .html or .png"),
    (["smollm2", "--dataset", "/nonexistent.json"], "cannot read the dataset /nonexistent.json"),
    (["smollm2", "--no-mgr"], "--no-mgr needs at least one --target"),
    (["smollm2", "--target", "ftp://x"], "expected [NAME=]http://host:port[#MODEL]"),
])
def test_mistakes_are_one_error_line(two_slots: Daemon, args: list[str], message: str) -> None:
    run = two_slots.cli("bench", *args, "-c", "1", "-n", "1", "--output-len", "2")
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_bad_arguments_are_usage_errors(two_slots: Daemon) -> None:
    for args in (["-c", "0"], ["--api", "grpc"], ["--request-rate", "-1"]):
        run = two_slots.cli("bench", "smollm2", *args)
        assert run.returncode == 2 and "usage:" in run.stderr, run.stderr


# the Ollama API's fast path ----------------------------------------------------------------------------------
def _rendering(chat: bool) -> Any:
    from mgr.daemon.api.ollama import _Rendering

    lease = SimpleNamespace(spec=SimpleNamespace(name="smol:latest"), load_seconds=0.0)
    return _Rendering(lease, chat, 0)  # type: ignore[arg-type]


STAMP = re.compile(rb'"created_at": "[^"]*"')
PLAIN_EVENTS = [  # vLLM's layouts (compact) and mgr's runner's (json.dumps)
    ({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
      "choices": [{"index": 0, "delta": {"content": 'say "hi" \\ \u00e9\u4e2d \n'}, "finish_reason": None}]}, True),
    # vLLM 0.25's own, as its server writes them (every field it set, None too): a chat token, with and without
    # return_token_ids, and a completion token (chat: rendered for /api/chat, else for /api/generate)
    ({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "smol:latest",
      "choices": [{"index": 0, "delta": {"content": " the"}, "logprobs": None, "finish_reason": None,
                   "token_ids": None}]}, True),
    ({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "smol:latest",
      "choices": [{"index": 0, "delta": {"content": " the"}, "logprobs": None, "finish_reason": None,
                   "token_ids": [279]}]}, False),  # /api/generate: a chat answer that keeps its ids
    ({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "smol:latest",
      "choices": [{"index": 0, "text": " the", "logprobs": None, "finish_reason": None, "stop_reason": None,
                   "prompt_token_ids": None, "token_ids": None}]}, False),
    ({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "smol:latest",
      "choices": [{"index": 0, "text": " the", "logprobs": None, "finish_reason": None, "stop_reason": None,
                   "prompt_token_ids": None, "token_ids": [279]}]}, False),
    # layouts of earlier vLLMs
    ({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
      "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None, "finish_reason": None,
                   "stop_reason": None, "token_ids": [17, 4]}]}, False),
    ({"id": "c2", "object": "text_completion", "created": 1, "model": "m",
      "choices": [{"index": 0, "text": " w", "logprobs": None, "finish_reason": None, "stop_reason": None,
                   "prompt_logprobs": None}], "usage": None}, False),
]


@pytest.mark.parametrize(("event", "chat"), PLAIN_EVENTS)
@pytest.mark.parametrize("compact", [True, False])
def test_the_fast_path_renders_what_the_parsed_path_renders(event: dict[str, Any], chat: bool,
                                                            compact: bool) -> None:
    payload = json.dumps(event, separators=(",", ":") if compact else None, ensure_ascii=compact).encode()
    fast, parsed = _rendering(chat), _rendering(chat)
    line = fast.plain(payload)
    assert line is not None and line.endswith(b"\n")
    [part] = parsed.parts(json.loads(payload))
    expected = parsed.line(part)
    assert json.loads(STAMP.sub(b'"created_at": ""', line)) == json.loads(STAMP.sub(b'"created_at": ""', expected))
    assert STAMP.sub(b"", line) == STAMP.sub(b"", expected) or not compact  # bytes too, as json.dumps writes
    assert fast.answer_ids == parsed.answer_ids and fast.first_token is not None


@pytest.mark.parametrize("event", [
    {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "delta": {"content": "x", "reasoning_content": "y"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}], "usage": {"prompt_tokens": 1}},
    {"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": []}, "finish_reason": None}]},
    {"choices": [{"index": 1, "delta": {"content": "x"}, "finish_reason": None}]},
    # the prompt's ids come on the first chunk of a completion that asked for them: parsed, to be kept
    {"choices": [{"index": 0, "text": "x", "finish_reason": None, "prompt_token_ids": [1, 2], "token_ids": [3]}]},
    {"error": {"message": "choices", "code": 500}},
])
def test_anything_else_is_parsed(event: dict[str, Any]) -> None:
    assert _rendering(True).plain(json.dumps(event).encode()) is None
