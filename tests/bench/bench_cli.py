"""Benchmark of the benchmark: `mgr bench` against tests/bench/bench_gguf.py on the same server, model and
load, cell by cell in one run, so that its numbers can be trusted to reproduce the GGUF benchmark (the
issue asks for within 10 %). Not a pytest test (on 2 shared cores the same cell swings by more than that
from one minute to the next); it prints what one run measured.

    .venv/bin/python tests/bench/bench_cli.py [--servers mgr,xllamacpp] [--clients 1,4,8] [--tokens 128]
        [--runs 3] [--model PATH] [--no-cache-prompt]

For each server (mgr's llama.cpp runner through the daemon; llama.cpp's own llama-server from the xllamacpp
package, when installed) and client count N: bench_gguf.py's measurement (N concurrent httpx streams of
one request each from /v1/chat/completions) and `mgr bench --no-mgr --target URL --api openai -c N -n N`
(the same N requests at once, the same output length with ignore_eos, prompts of about the same length),
alternating `--runs` times. It prints the medians of both, each run's ratio (mgr bench's cell against
bench_gguf's beside it) and their median, and both sides' prompt tokens per request. Both sample greedily;
both leave llama-server's prompt cache on (its default, which bench_gguf.py alone turns off unless --cache-prompt;
`--no-cache-prompt` here turns it off for bench_gguf's side: its prompts share a prefix after the template,
mgr bench's random words do not, so with the cache on the two read different TTFTs from llama-server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import bench_gguf


def mgr_bench(url: str, model: str, clients: int, tokens: int, input_len: int, report: Path) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-m", "mgr.cli", "bench", "x", "--no-mgr", "--target", f"{url}#{model}",
                          "--api", "openai", "-c", str(clients), "-n", str(clients), "--output-len", str(tokens),
                          "--input-len", str(input_len), "--temperature", "0", "--json", str(report)],
                         capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        raise RuntimeError(f"mgr bench failed: {run.stderr}")
    [cell] = json.loads(report.read_text())["cells"]
    return {"tok_s": cell["output_throughput"], "ttft": cell["ttft_ms"]["p50"],
            "tokens": cell["total_output_tokens"], "prompt": cell["total_input_tokens"] / max(cell["completed"], 1)}


async def gguf_cell(server: bench_gguf.Server, args: argparse.Namespace, clients: int,
                    eos_ids: list[int]) -> dict[str, float]:
    prompts = [f"Write a long story about {bench_gguf.THINGS[i % len(bench_gguf.THINGS)]}." for i in range(clients)]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        cell = await bench_gguf.measure_cell(server, client, args, eos_ids, prompts)
    prompt = statistics.mean(r.prompt_tokens or 0 for r in cell.results)
    return {"tok_s": cell.tok_s, "ttft": cell.ttft_p50_ms, "tokens": cell.tokens, "prompt": prompt}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="mgr,xllamacpp")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=12,
                        help="mgr bench's prompt length: about bench_gguf's 'Write a long story about ...'")
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("MGR_TEST_GGUF", bench_gguf.DEFAULT_GGUF)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--idle-wait", type=float, default=10.0,
                        help="bench_gguf's wait for a quiet machine before each of its cells")
    parser.add_argument("--cache-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="bench_gguf's requests keep llama-server's prompt cache on (its default, which mgr bench "
                             "leaves alone): its slots then reuse the cached prefix the prompts share")
    args = parser.parse_args()
    eos_ids = bench_gguf.gguf_eos_ids(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="mgr-bench-cli-"))
    rows = []
    for name in args.servers.split(","):
        if name == "xllamacpp":
            try:
                import xllamacpp  # noqa: F401
            except ImportError:
                print("xllamacpp is not installed (pip install -e .[bench]): skipped", file=sys.stderr)
                continue
        server = bench_gguf.make_server(name, args, workdir)
        try:
            server.start()
            server.warm()
            for clients in (int(c) for c in args.clients.split(",")):
                ours, theirs = [], []
                for run in range(args.runs):
                    order = ["gguf", "mgr bench"] if run % 2 == 0 else ["mgr bench", "gguf"]
                    for which in order:
                        if which == "gguf":
                            theirs.append(asyncio.run(gguf_cell(server, args, clients, eos_ids)))
                        else:
                            ours.append(mgr_bench(server.base_url, server.model, clients, args.tokens,
                                                  args.input_len, workdir / "cell.json"))
                # paired: each run's mgr bench cell against the bench_gguf cell right beside it, so a swing of
                # the shared cores between runs falls on both sides of a ratio
                ratios = [m["tok_s"] / g["tok_s"] for g, m in zip(theirs, ours)]
                gguf, bench = ({k: statistics.median(c[k] for c in cells) for k in ("tok_s", "ttft", "prompt")}
                               for cells in (theirs, ours))
                row = Row(name, clients, gguf["tok_s"], gguf["ttft"], gguf["prompt"], bench["tok_s"], bench["ttft"],
                          bench["prompt"], ratios)
                rows.append(row)
                print(f"  {name} {clients} clients: bench_gguf {row.gguf_tok_s:.1f} tok/s (TTFT p50 "
                      f"{row.gguf_ttft:.0f} ms), mgr bench {row.bench_tok_s:.1f} tok/s (TTFT p50 {row.bench_ttft:.0f}"
                      f" ms), ratio per run {' '.join(f'{r:.3f}' for r in ratios)}, median {row.ratio:.3f}",
                      flush=True)
        finally:
            server.stop()
    print("\n| server | clients | bench_gguf tok/s | mgr bench tok/s | ratio (median of paired runs) | per run | "
          "bench_gguf TTFT p50 ms | mgr bench TTFT p50 ms | bench_gguf prompt tokens | mgr bench prompt tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        flag = "" if abs(row.ratio - 1) <= 0.10 else " (outside 10 %)"
        print(f"| {row.server} | {row.clients} | {row.gguf_tok_s:.1f} | {row.bench_tok_s:.1f} | "
              f"{row.ratio:.3f}{flag} | {' '.join(f'{r:.3f}' for r in row.ratios)} | {row.gguf_ttft:.0f} | "
              f"{row.bench_ttft:.0f} | {row.gguf_prompt:.0f} | {row.bench_prompt:.0f} |")
    return 0


@dataclass
class Row:
    """One server and client count: the medians of both measurements over the runs, and each run's ratio."""

    server: str
    clients: int
    gguf_tok_s: float
    gguf_ttft: float
    gguf_prompt: float  # prompt tokens per request, as the server counted them
    bench_tok_s: float
    bench_ttft: float
    bench_prompt: float
    ratios: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


if __name__ == "__main__":
    sys.exit(main())
