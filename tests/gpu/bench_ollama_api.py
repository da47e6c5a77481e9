"""Issue 16, item 4 on the GPU: the Ollama API (/api/chat, /api/generate) and the OpenAI relay through mgr
against the same vLLM runner addressed directly, at 1, 16, 64 and 256 concurrent streams, measured with
`mgr bench` itself. The direct target is mgr's own vLLM runner process (its port and secret read from the
process), so both sides see the same engine, cell by cell (mgr bench alternates mgr and the target), and
`--repeat` runs the whole sweep again so every ratio is a median of paired runs. Every path samples alike
(Ollama's default options, which the Ollama API applies, are sent through the OpenAI API as well), and each
endpoint does the same work through every path: chat is /api/chat and /v1/chat/completions, completion is
/api/generate with raw and /v1/completions (without raw, /api/generate is the chat path with a templated prompt,
which the chat rows measure; compared with a raw /v1/completions it did more work: 0.84 of direct at 64 streams
on the H200, 2026-12-01).

    python3 tests/gpu/bench_ollama_api.py /tmp/smollm2-st [--clients 1,16,64,256] [--tokens 128]
        [--repeat 3] [--per-client 4] [--endpoints chat,completion] [--again] [--together]

Item 4 was decided (and passed, 2026-12-01) with `--clients 1,16,64,256 --repeat 3 --per-client 8 --together
--again`; its numbers are in tests/gpu/README.md.

With `--together` a run's cells go as one (`mgr bench --together`): their requests take turns through the same
streams, so every path meets the engine's swings and every place in its batches alike (one cell after another,
direct vLLM against itself scattered 0.76-1.23 at 64 streams on the H200). Each path then gets the same share of
tokens/s by construction, so a path's throughput against direct is judged as direct's mean end-to-end request
time over the path's (in a closed loop each stream's throughput is its tokens over that time). `--again`
measures direct twice in every run, an A/A pair, and prints again / direct beside the ratios.

Prints, per endpoint and concurrency, tokens/s and TTFT p50 of mgr's Ollama API, mgr's OpenAI relay and
direct vLLM, and the ratios; under each row, how busy the server process itself was (mgr's daemon, vLLM's API
server: its CPU time over the cell, of one core, from its /metrics; near 100 % that process is the limit).
PASS when both mgr paths keep >= 0.97 of direct vLLM's throughput and add <= 5 ms to its TTFT p50.
Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import FAILED, Daemon, check, flag, say

ROOT = Path(os.environ.get("MGR_GPU_ROOT", "/tmp/mgr-gpu-bench"))


def fast_path_takes_vllms_token_events(direct: str, served: str, secret: str) -> None:
    """Every token event real vLLM streams (chat and completion, with and without return_token_ids) is one
    the Ollama API renders from its bytes (api/ollama.py `_Rendering.plain`), not parsed: a layout the fast
    path misses costs each token a JSON parse (vLLM 0.25's "token_ids":null once did, unseen here)."""
    from mgr.daemon.api.ollama import _Rendering

    lease = SimpleNamespace(spec=SimpleNamespace(name=served), load_seconds=0.0)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to twenty."}]}),
                       ("/v1/completions", {"prompt": "One, two, three,"})):
        for ids in (False, True):
            request = {"model": served, "stream": True, "max_tokens": 16, "ignore_eos": True,
                       "stream_options": {"include_usage": True}, **body, **({"return_token_ids": True} if ids else {})}
            with httpx.stream("POST", direct + path, json=request, timeout=60,
                              headers={"Authorization": f"Bearer {secret}"}) as response:
                payloads = [line[5:].strip().encode() for line in response.iter_lines() if line.startswith("data:")]
            events = [p for p in payloads if p != b"[DONE]" and json.loads(p).get("choices")]
            # the first (the role, or the prompt's ids) and the last (the finish reason) are parsed by design
            middle = events[1:-1]
            # as rendered for /api/chat (a chat without ids), else for /api/generate (it keeps ids for `context`)
            rendering = _Rendering(lease, path == "/v1/chat/completions" and not ids, 0)  # type: ignore[arg-type]
            missed = [p for p in middle if rendering.plain(p) is None]
            check(bool(middle) and not missed, f"{path}{' return_token_ids' if ids else ''}: {len(middle)} token "
                                               f"events, all on the fast path {missed[:1]!r}")


Cells = dict[tuple[str, str, int], list[tuple[float, float]]]


def report(endpoint: str, clients_list: list[int], cells: Cells, cpu: dict[tuple[str, str, int], list[float]],
           unit: str = "tok/s") -> None:
    """The endpoint's table (medians of paired runs) and its checks: (server, api, concurrency) -> per run
    (tokens/s, TTFT p50 ms) in `cells` (with --together a stream's tokens/s over its requests' mean end-to-end
    time: `unit`), the server's CPU share in `cpu`."""
    path = "/api/chat" if endpoint == "chat" else "/api/generate raw"
    say(f"\n| {endpoint} | streams | mgr {path} {unit} | mgr OpenAI {unit} | direct vLLM {unit} | "
        f"Ollama / direct | OpenAI / direct | Ollama TTFT +ms | OpenAI TTFT +ms |")
    say("|---|---|---|---|---|---|---|---|---|")
    for clients in clients_list:
        ollama, openai = cells.get(("mgr", "ollama", clients)), cells.get(("mgr", "openai", clients))
        base = cells.get(("direct", "openai", clients))
        if not (ollama and openai and base):
            check(False, f"{endpoint} c={clients}: cells missing")
            continue
        runs = min(len(ollama), len(openai), len(base))
        # paired: each repeat's mgr cell against the direct cell of the same run (right after it, or
        # at the same time with --together)
        ratios = {name: statistics.median(side[i][0] / base[i][0] for i in range(runs))
                  for name, side in (("ollama", ollama), ("openai", openai))}
        added = {name: statistics.median(side[i][1] - base[i][1] for i in range(runs))
                 for name, side in (("ollama", ollama), ("openai", openai))}
        say(f"| {endpoint} | {clients} | {statistics.median(c[0] for c in ollama):,.0f} | "
            f"{statistics.median(c[0] for c in openai):,.0f} | {statistics.median(c[0] for c in base):,.0f} | "
            f"{ratios['ollama']:.3f} | {ratios['openai']:.3f} | {added['ollama']:+.1f} | "
            f"{added['openai']:+.1f} |")
        again = cells.get(("again", "openai", clients))
        if again:
            # direct vLLM against itself, paired alike: what a ratio of 1.0 looks like on this machine
            pairs = range(min(len(again), len(base)))
            floor = statistics.median(again[i][0] / base[i][0] for i in pairs)
            say(f"|   | direct again | | | {statistics.median(c[0] for c in again):,.0f} | "
                f"{floor:.3f} (again / direct) | "
                f"per run: {' '.join(f'{again[i][0] / base[i][0]:.3f}' for i in pairs)} | "
                f"{statistics.median(again[i][1] - base[i][1] for i in pairs):+.1f} | |")
            if abs(floor - 1) > 0.03:
                say(f"     note: at {clients} streams direct vLLM against itself came out {floor:.3f}: "
                    f"this run's noise is wider than the 3 % judged, so its verdict is not decisive")
        say(f"|   | server CPU | {statistics.median(cpu[('mgr', 'ollama', clients)]):.0%} | "
            f"{statistics.median(cpu[('mgr', 'openai', clients)]):.0%} | "
            f"{statistics.median(cpu[('direct', 'openai', clients)]):.0%} | | | | |")
        for name in ("ollama", "openai"):
            check(ratios[name] >= 0.97 and added[name] <= 5.0,
                  f"{endpoint} {name} at {clients} streams: {ratios[name]:.3f} of direct vLLM (>= 0.97), "
                  f"TTFT p50 {added[name]:+.1f} ms (<= +5)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a safetensors model folder (SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", default="1,16,64,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=4, help="requests per stream in a cell")
    parser.add_argument("--endpoints", default="chat,completion", help="chat (/api/chat) and/or completion "
                                                                       "(/api/generate raw)")
    parser.add_argument("--together", action="store_true",
                        help="mgr bench --together: a run's cells (mgr's two APIs, direct vLLM) as one, their "
                             "requests interleaved through the same streams, judged by their requests' mean "
                             "end-to-end time (one after the other, direct vLLM against itself scattered 0.76-1.23 "
                             "on the H200)")
    parser.add_argument("--again", action="store_true",
                        help="measure direct vLLM a second time in every run (an A/A pair: the noise floor the "
                             "ratios are judged against)")
    args = parser.parse_args()
    daemon = Daemon(ROOT, "", port=11500, MGR_KEEP_ALIVE="-1", MGR_NUM_PARALLEL="512")
    daemon.start()
    try:
        made = daemon.mgr("create", "smol", "--from", args.model)
        if not check(made.returncode == 0, f"mgr create smol --from {args.model} {made.stderr[-300:]}"):
            return 1
        answer = daemon.chat("smol")
        check(not answer.startswith("HTTP"), f"smol answers: {answer[:80]!r}")
        [runner] = daemon.servers()
        argv = runner.cmdline()
        direct = f"http://127.0.0.1:{flag(argv, '--port')}"
        served = flag(argv, "--served-model-name") or "smol:latest"
        secret = runner.environ().get("VLLM_API_KEY", "")
        say(f"     direct vLLM: {direct} as {served!r} (mgr's own runner process {runner.pid})")
        fast_path_takes_vllms_token_events(direct, served, secret)
        for endpoint in args.endpoints.split(","):
            # (server, api, concurrency) -> [(tok/s, TTFT p50 ms)] over the repeats
            cells: Cells = {}
            # the same -> the server process's own CPU over the cell, of one core (mgr's daemon; vLLM's API server)
            cpu: dict[tuple[str, str, int], list[float]] = {}
            for repeat, streams in ((r, c) for r in range(args.repeat) for c in args.clients.split(",")):
                # one mgr bench run per concurrency, each cell --per-client requests per stream (longer cells
                # average out the engine's own swings: direct vLLM alone moved 12.9k-14.9k tokens/s between
                # 2.5 s cells at 64 streams on the H200)
                numbers = Path(tempfile.mkdtemp()) / "bench.json"
                prompts = max(args.per_client * int(streams), 16)
                # the APIs' order alternates between repeats, so neither is always the cell furthest from direct's
                apis = "ollama,openai" if repeat % 2 == 0 else "openai,ollama"
                run = daemon.mgr("bench", "smol", "--api", apis, "--endpoint", endpoint,
                                 "--concurrency", streams, "--num-prompts", str(prompts),
                                 "--output-len", str(args.tokens), "--input-len", str(args.input_len),
                                 "--target", f"direct={direct}#{served}",
                                 *(("--target", f"again={direct}#{served}") if args.again else ()),
                                 *(("--together",) if args.together else ()),
                                 # a seed of each run's own: the same seed draws the same first prompts, which
                                 # vLLM's prefix cache would serve the later run's first cell from
                                 "--target-key", secret, "--seed", str(1000 * repeat + int(streams)),
                                 "--json", str(numbers),
                                 # the same sampling through every path: Ollama's defaults, which the Ollama
                                 # API applies, sent to the OpenAI relay and to vLLM directly too
                                 "--temperature", "0.8", "-o", "top_k=40", "-o", "top_p=0.9",
                                 "-o", "repeat_penalty=1.1")
                say(run.stderr.rstrip())
                if not check(run.returncode == 0, f"mgr bench --endpoint {endpoint} c={streams} (run {repeat + 1})"):
                    continue
                say(run.stdout.rstrip())
                for cell in json.loads(numbers.read_text())["cells"]:
                    check(cell["errors"] == 0, f"{cell['server']} {cell['api']} c={cell['concurrency']}: "
                                               f"no errors ({cell['first_errors']})")
                    if cell["saturated"]:
                        say(f"     note: the load generator saturated in {cell['server']} {cell['api']} "
                            f"c={cell['concurrency']} (CPU {cell['client_cpu']:.0%})")
                    # run as one, the paths share tokens/s evenly: each one's speed is a stream's tokens/s over
                    # its requests' mean time
                    speed = (cell["total_output_tokens"] / max(cell["completed"], 1) / cell["e2el_ms"]["mean"] * 1000
                             if args.together else cell["output_throughput"])
                    cells.setdefault((cell["server"], cell["api"], cell["concurrency"]), []).append(
                        (speed, cell["ttft_ms"]["p50"]))
                    cpu.setdefault((cell["server"], cell["api"], cell["concurrency"]), []).append(
                        cell["server_cpu"] if cell["server_cpu"] is not None else float("nan"))
            report(endpoint, [int(c) for c in args.clients.split(",")], cells, cpu,
                   "stream tok/s" if args.together else "tok/s")
    finally:
        daemon.stop()
    say(f"\n{len(FAILED)} checks failed" if FAILED else "\nall checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
