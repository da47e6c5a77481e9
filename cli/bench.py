"""`mgr bench`: throughput and latency of models through mgr and other servers.

A sweep of concurrency levels per model and API, measured the way `vllm bench serve` measures (requests/s,
output and total tokens/s, TTFT, TPOT and ITL mean/p50/p90/p99), with other servers (`--target`: Ollama,
a bare vLLM, llama-server) measured cell by cell in the same run. The load generator (loadgen.py) and the
plots (benchplot.py) are imported by the handler only: the CLI starts on the stdlib.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .client import API_KEY_ENV, Client

if TYPE_CHECKING:
    from .loadgen import CellResult, Endpoint

APIS = ("ollama", "openai")
PLOT_TYPES = (".png", ".svg", ".html")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("every value must be 1 or more")
    return values


def _apis(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in APIS for v in values):
        raise argparse.ArgumentTypeError(f"--api takes ollama, openai or both separated by a comma, not {text!r}")
    return values


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the request rate must be above 0 (inf: all at once, closed loop)")
    return value


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds this module's subcommands to the CLI's parser (cli/main.py)."""
    bench = command("bench", "Measure throughput and latency of models (like vllm bench serve), side by side "
                             "with other servers")
    bench.add_argument("models", nargs="+", metavar="MODEL", help="models to measure, e.g. smollm2:135m")
    bench.add_argument("--concurrency", "-c", type=_int_list, default=[1, 4, 16, 64], metavar="N,N,...",
                       help="requests in flight at once, one cell each (default: 1,4,16,64)")
    bench.add_argument("--input-len", type=int, default=64, metavar="TOKENS",
                       help="prompt length in tokens, about (random words; default 64)")
    bench.add_argument("--output-len", type=int, default=None, metavar="TOKENS",
                       help="tokens every answer generates (default 128; with --dataset, each conversation's own)")
    bench.add_argument("--dataset", metavar="FILE", help="prompts from a ShareGPT-style JSON file instead")
    bench.add_argument("--eos", action="store_true",
                       help="let answers end at end-of-sequence (default: ignored, so every answer has the same "
                            "length)")
    bench.add_argument("--temperature", type=float, default=None,
                       help="sampling temperature of every request (default: each server's own default)")
    bench.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", type=_option,
                       help="a sampling option sent with every request, by Ollama's name (top_k=40, "
                            "repeat_penalty=1.1): as an option through the Ollama API, a field through the "
                            "OpenAI API; repeatable")
    bench.add_argument("--num-prompts", "-n", type=int, default=None, metavar="N",
                       help="requests per cell (default: 4 x the concurrency, at least 16)")
    bench.add_argument("--request-rate", type=_rate, default=math.inf, metavar="PER_S",
                       help="Poisson arrivals at this many requests/s, at most the concurrency in flight "
                            "(default: inf, closed loop)")
    bench.add_argument("--api", type=_apis, default=["ollama"], metavar="API",
                       help="ollama, openai, or ollama,openai for both (default: ollama)")
    bench.add_argument("--endpoint", choices=("chat", "completion"), default="chat",
                       help="chat (/api/chat, /v1/chat/completions) or completion (/api/generate raw, "
                            "/v1/completions: the prompt as it is, no chat template); default chat")
    bench.add_argument("--target", action="append", default=[], metavar="[NAME=]URL[#MODEL]",
                       help="another server to measure cell by cell with mgr (Ollama, vLLM, llama-server); "
                            "#MODEL: its name for the model there (default: the same name, or the only one it "
                            "serves); repeatable")
    bench.add_argument("--target-key", metavar="KEY", default="",
                       help="an API key the --target servers want (sent as Authorization: Bearer KEY)")
    bench.add_argument("--no-mgr", action="store_true", help="measure only the --target servers")
    bench.add_argument("--together", action="store_true",
                       help="run the cells of a concurrency (every server and API) as one: their requests "
                            "interleaved through the same streams, so paths to one engine (mgr and its runner's "
                            "own port) meet its swings and its batches alike")
    bench.add_argument("--processes", type=int, default=0, metavar="N",
                       help="load-generator processes (default: one per 16 streams, at most half the cores)")
    bench.add_argument("--seed", type=int, default=0, help="for the prompts and the arrivals (default 0)")
    bench.add_argument("--json", dest="json_file", metavar="FILE", help="write every cell's numbers to FILE")
    bench.add_argument("--plot", metavar="FILE", help="tokens/s and TTFT against concurrency: FILE.svg, .html "
                                                      "(self-contained) or .png (needs matplotlib)")
    bench.set_defaults(handler=cmd_bench)


WARM_UP_TOKENS = 16  # each answer of the warm-up round at the highest concurrency


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    model_name: str | None  # the target's own name for every model ("#MODEL"); None: resolved per model
    is_mgr: bool


def parse_target(spec: str) -> Server:
    name = ""
    if "=" in spec.split("://", 1)[0]:
        name, spec = spec.split("=", 1)
    url, _, model = spec.partition("#")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--target {spec!r}: expected [NAME=]http://host:port[#MODEL]")
    return Server(name or parts.netloc, url.rstrip("/"), model or None, False)


def _get(url: str, path: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes | None:
    """A GET's body when it answers 200; None otherwise or when nothing answers."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
    try:
        connection.request("GET", path, headers=dict(headers))
        response = connection.getresponse()
        data = response.read()
        return data if response.status == 200 else None
    except OSError:
        return None
    finally:
        connection.close()


def _get_json(url: str, path: str) -> Any:
    data = _get(url, path)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def server_cpu_seconds(url: str, headers: tuple[tuple[str, str], ...]) -> float | None:
    """The server process's own CPU time so far, from its /metrics (prometheus_client's
    process_cpu_seconds_total: mgr's daemon, vLLM's API server); None where it has none."""
    for line in (_get(url, "/metrics", headers) or b"").splitlines():
        if line.startswith(b"process_cpu_seconds_total "):
            try:
                return float(line.split()[1])
            except ValueError:
                return None
    return None


def served_models(url: str) -> list[str]:
    """The models a server lists (OpenAI's /v1/models, else Ollama's /api/tags)."""
    answer = _get_json(url, "/v1/models")
    if isinstance(answer, dict) and isinstance(answer.get("data"), list):
        return [str(m.get("id")) for m in answer["data"] if isinstance(m, dict)]
    answer = _get_json(url, "/api/tags")
    if isinstance(answer, dict) and isinstance(answer.get("models"), list):
        return [str(m.get("name")) for m in answer["models"] if isinstance(m, dict)]
    return []


def model_at(server: Server, model: str, listed: dict[str, list[str]]) -> str:
    if server.model_name or server.is_mgr:
        return server.model_name or model
    if server.url not in listed:
        listed[server.url] = served_models(server.url)
    names = listed[server.url]
    return names[0] if len(names) == 1 and model not in names else model


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


HEADERS = ["SERVER", "MODEL", "API", "CONC", "REQS", "ERR", "REQ/S", "OUT TOK/S", "TOTAL TOK/S",
           "TTFT MEAN", "P50", "P90", "P99", "ITL MEAN", "P50", "P90", "P99", "E2E P50", "SRV CPU"]


def table_row(row: dict[str, Any]) -> list[str]:
    ttft, itl = row["ttft_ms"], row["itl_ms"]
    return [row["server"], row["model"], row["api"], str(row["concurrency"]), str(row["completed"]),
            str(row["errors"]), _fmt(row["request_throughput"], 2), _fmt(row["output_throughput"]),
            _fmt(row["total_token_throughput"]),
            *(_fmt(ttft[k]) for k in ("mean", "p50", "p90", "p99")), *(_fmt(itl[k]) for k in ("mean", "p50", "p90",
                                                                                                "p99")),
            _fmt(row["e2el_ms"]["p50"]), "-" if row["server_cpu"] is None else f"{row['server_cpu']:.0%}"]


def _check_plot(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in PLOT_TYPES:
        raise ValueError(f"--plot {path}: the file must end in .svg, .html or .png")
    if ext == ".png":
        try:
            import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            raise ValueError("--plot FILE.png needs matplotlib (pip install matplotlib); "
                             ".svg and .html need nothing") from None


class Progress:
    """One line on stderr, rewritten while a cell runs (on a terminal), then the cell's summary line."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()

    def update(self, label: str, total: int) -> Callable[[int, int, float], None]:
        last = [0.0]

        def show(done: int, tokens: int, elapsed: float) -> None:
            if not self.live or time.monotonic() - last[0] < 0.25:
                return
            last[0] = time.monotonic()
            rate = tokens / elapsed if elapsed > 0 else 0.0
            print(f"\r\033[K{label}: {done}/{total} requests, {rate:,.0f} tok/s, {elapsed:.1f} s",
                  end="", file=sys.stderr, flush=True)
        return show

    def done(self, label: str, cell: CellResult) -> None:
        prefix = "\r\033[K" if self.live else ""
        note = ""
        if cell.errors:
            note += f", {cell.errors} errors ({'; '.join(cell.first_errors)})"
        if cell.saturated:
            note += (f"; the load generator saturated (busiest process {cell.client_cpu:.0%} CPU, loop late "
                     f"{cell.client_lag_ms:.1f} ms): use --processes {cell.client_processes * 2}")
        print(f"{prefix}{label}: {cell.output_throughput:,.1f} tok/s, {cell.request_throughput:.2f} req/s, "
              f"TTFT p50 {cell.ttft_ms['p50']:,.1f} ms, ITL p50 {cell.itl_ms['p50']:,.1f} ms{note}",
              file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace, client: Client) -> int:
    from .loadgen import BenchError  # the load generator forks processes: imported here only

    try:
        return _bench(args, client)
    except (BenchError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace, client: Client) -> int:
    from . import benchplot, loadgen

    if args.input_len < 1 or (args.output_len is not None and args.output_len < 1):
        raise ValueError("--input-len and --output-len must be 1 or more")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError("--num-prompts must be 1 or more")
    if args.plot:
        _check_plot(args.plot)
    servers = [parse_target(spec) for spec in args.target]
    if not args.no_mgr:
        client.request_json("GET", "/api/version")  # the daemon answers (else the usual "could not connect")
        servers.insert(0, Server("mgr", client.base_url, None, True))
    if not servers:
        raise ValueError("--no-mgr needs at least one --target")
    key = os.environ.get(API_KEY_ENV, "").strip()
    progress = Progress()
    listed: dict[str, list[str]] = {}
    skipped: set[tuple[str, str, str]] = set()
    rows: list[dict[str, Any]] = []
    output_len = args.output_len or 128
    sampling: dict[str, Any] = dict(args.option)
    if args.temperature is not None:
        sampling["temperature"] = args.temperature

    def endpoint_of(server: Server, api: str) -> Endpoint:
        own = key if server.is_mgr else args.target_key  # mgr's key (MGR_API_KEY) goes to mgr only
        headers = (("Authorization", f"Bearer {own}"),) if own else ()
        return loadgen.Endpoint(server.url, api, args.endpoint, headers)

    # warm-up: every model loaded and every path answered once, before anything is timed
    for model in args.models:
        for api in args.api:
            for server in servers:
                name = model_at(server, model, listed)
                body = loadgen.request_body(api, args.endpoint, name, "Hello", 8, not args.eos, sampling)
                print(f"warming up {server.name} {name} ({api})...", file=sys.stderr, flush=True)
                warm = loadgen.run_cell(endpoint_of(server, api), [body], 1, processes=1)
                if warm.errors:
                    error = "; ".join(warm.first_errors)
                    if not server.is_mgr and ("HTTP 404" in error or "HTTP 405" in error):
                        print(f"  {server.name} does not serve {endpoint_of(server, api).path} for {name}: "
                              f"skipped ({error})", file=sys.stderr)
                        skipped.add((server.name, model, api))
                        continue
                    raise loadgen.BenchError(f"{server.name}: the warm-up request to {name} failed: {error}")
                # then one round at the sweep's highest concurrency, sampled as the timed cells are: an engine
                # compiles kernels the first time it sees a batch that size (vLLM stalled ~8 s in the first
                # 16- or 64-stream cell on the H200, whichever path went first), and the servers open their
                # connections; none of that belongs to the first cell measured
                streams = max(args.concurrency)
                if streams > 1:
                    print(f"warming up {server.name} {name} ({api}) at {streams} streams...", file=sys.stderr,
                          flush=True)
                    bodies = [loadgen.request_body(api, args.endpoint, name, prompt, WARM_UP_TOKENS, not args.eos,
                                                   sampling)
                              for prompt in loadgen.random_prompts(streams, args.input_len, args.seed - 1)]
                    warm = loadgen.run_cell(endpoint_of(server, api), bodies, streams, processes=args.processes)
                    if warm.errors:
                        print(f"  {server.name}: {warm.errors} of the {streams} warm-up requests failed: "
                              f"{'; '.join(warm.first_errors)}", file=sys.stderr)

    cells = 0
    for concurrency in args.concurrency:
        count = args.num_prompts or max(4 * concurrency, 16)
        for model in args.models:
            planned: list[tuple[Server, str, str, Endpoint, list[bytes]]] = []  # server, API, model name, ...
            for api in args.api:
                for server in servers:  # mgr and the targets alternate, cell by cell
                    if (server.name, model, api) in skipped:
                        continue
                    # prompts of the same lengths, but each cell its own: a prompt cache must not make the
                    # second server of a pair look faster for having seen the first one's prompts
                    cells += 1
                    seed = args.seed + 7919 * cells
                    if args.dataset:
                        pairs = loadgen.sharegpt_prompts(args.dataset, count, seed)
                        prompts = [p for p, _ in pairs]
                        lengths = [args.output_len or n for _, n in pairs]
                    else:
                        prompts = loadgen.random_prompts(count, args.input_len, seed)
                        lengths = [output_len] * count
                    name = model_at(server, model, listed)
                    bodies = [loadgen.request_body(api, args.endpoint, name, prompt, n, not args.eos, sampling)
                              for prompt, n in zip(prompts, lengths, strict=True)]
                    planned.append((server, api, name, endpoint_of(server, api), bodies))
            batches = [planned] if args.together else [[one] for one in planned]
            for batch in batches:
                labels = [f"{server.name} {name} {api} c={concurrency}" for server, api, name, _, _ in batch]
                label = labels[0] if len(batch) == 1 else f"{len(batch)} cells together c={concurrency}"
                # each server's CPU once over the batch (cells of one server run as one share it)
                urls = {server.url: endpoint.headers for server, _, _, endpoint, _ in batch}
                cpu_before = {url: server_cpu_seconds(url, headers) for url, headers in urls.items()}
                results = loadgen.run_cells([loadgen.Load(endpoint, bodies) for _, _, _, endpoint, bodies in batch],
                                            concurrency, args.request_rate, args.processes, args.seed,
                                            progress.update(label, count * len(batch)))
                cpu_after = {url: server_cpu_seconds(url, headers) for url, headers in urls.items()}
                for (server, api, name, _, _), cell, cell_label in zip(batch, results, labels, strict=True):
                    progress.done(cell_label, cell)
                    # the server process's CPU time over the cell, a share of one core (runners and engine
                    # processes apart): near 100 %, that one process is what limits the cell
                    before, after = cpu_before[server.url], cpu_after[server.url]
                    server_cpu = None if before is None or after is None else (after - before) / cell.duration
                    rows.append({"server": server.name, "url": server.url, "model": name, "api": api,
                                 "endpoint": args.endpoint, **cell.as_dict(), "server_cpu": server_cpu,
                                 "together": len(batch) > 1})

    from .format import table

    print(table(HEADERS, [table_row(row) for row in rows]))
    print("TTFT, ITL and E2E (a request's whole time) in ms; tokens/s over each cell's whole duration; SRV CPU: "
          "the server process's own CPU time over the cell, of one core (from its /metrics; its engine processes "
          "apart)")
    if args.together:
        print("--together: the cells of a concurrency ran as one, their requests interleaved through the same "
              "streams (tokens/s then split evenly; compare TTFT, ITL and E2E); SRV CPU shared by a server's cells")
    if any(row["saturated"] for row in rows):
        print("Note: the load generator saturated in some cells (see above); their numbers are the client's")
    if args.json_file:
        report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": args.models, "apis": args.api,
                  "endpoint": args.endpoint, "input_len": None if args.dataset else args.input_len,
                  "output_len": output_len if not args.dataset else args.output_len, "dataset": args.dataset,
                  "ignore_eos": not args.eos, "sampling": sampling, "together": args.together, "cells": rows}
        with open(args.json_file, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=1)
    if args.plot:
        benchplot.write_plot(args.plot, rows)
    return 0
