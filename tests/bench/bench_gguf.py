"""Benchmark: mgr's llama.cpp runner (continuous batching, through the daemon) against llama.cpp's own
llama-server (embedded in the `xllamacpp` package, the engine Ollama runs) and llama-cpp-python's
`llama_cpp.server`, on the same GGUF, in one run.

Not a pytest test. Run:

    .venv/bin/python tests/bench/bench_gguf.py [--clients 1,4,8] [--tokens 128] [--model PATH]

Every server gets the same model file, the same thread count and (where it has slots) the same number of
slots; only one server runs at a time. For each server and client count, N concurrent clients stream one
chat completion each from /v1/chat/completions (distinct prompts, temperature 0) after one warm-up request;
the script reports aggregate generated tokens per second (sum of generated tokens / wall time from the first
send to the last finish), the median time to first token (first non-empty content chunk) and the tokens
actually generated, then the ratios the issue targets.

Generating the full --tokens everywhere: mgr's runner and llama-server honour `ignore_eos`; llama_cpp.server
has none, so its EOS tokens are banned with `logit_bias`, sent to it alone (a logit_bias would take mgr's runner
off its greedy argmax onto llama.cpp's sampler chain, work the other two servers' requests do not ask for). The
prompts ask for long stories besides, and the table shows the tokens each one generated.

The machine may be shared: ggml's worker threads spin at barriers, so on 2 cores even 10% of CPU taken by
another process can cut a server's throughput by a third. Before each cell the script waits for the machine to be
idle; it measures the CPU time used by everything outside the benchmark during the cell and measures the
cell again (up to --retries times) when that exceeds --max-foreign of the machine. Cells still disturbed
are flagged in the table. The CPU seconds of every process involved are printed after the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import NotServing, wait_until_serving

DEFAULT_GGUF = Path.home() / ".cache" / "mgr-test" / "SmolLM2-135M-Instruct.Q4_1.gguf"
THINGS = [
    "a dragon who is afraid of fire", "a lighthouse keeper on a distant planet", "a clockmaker's apprentice",
    "a cat who becomes mayor of a small town", "a submarine crew that finds a sunken city",
    "a robot learning to paint", "a girl who can talk to trees", "two rival bakers in Paris",
    "a wizard who lost his memory", "a train that never stops", "an astronaut stranded on the Moon",
    "a detective in ancient Rome", "a village hidden in the clouds", "a musician who hears colours",
    "a fox and a crow who start a business", "the last library on Earth", "a knight who hates horses",
    "a pirate searching for a map to home", "a scientist who shrinks herself", "a ghost who runs a cafe",
]
SERVERS = ("mgr", "xllamacpp", "llama_cpp.server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_eos_ids(path: Path) -> list[int]:
    """End-of-generation token ids from the GGUF metadata (EOS and EOT when present)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        f = reader.fields.get(key)
        if f is not None:
            ids.append(int(f.parts[f.data[0]][0]))
    return sorted(set(ids))


# --- servers --------------------------------------------------------------------------------------------

class Server:
    """A server in its own process group, so that stop() can always take the whole group down."""

    name = ""
    # whether the server takes `ignore_eos`; one that does not gets the end tokens banned with logit_bias
    takes_ignore_eos = True

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model = "model"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_pgids: set[int] = set()  # other process groups to take down (mgr's runners)
        self.log_path = workdir / f"{self.name}.log"
        self.description = ""

    def popen(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_http(self, path: str, timeout: float) -> None:
        assert self.process is not None
        try:
            wait_until_serving(self.base_url + path, self.process, timeout, interval=0.2)
        except NotServing as e:
            raise RuntimeError(f"{self.name} {e}:\n{self.log_tail()}") from None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        raise NotImplementedError

    def warm(self) -> None:
        """Anything that must happen before measuring (mgr: load the model)."""

    def pids(self) -> list[int]:
        """The processes doing the work (for CPU accounting)."""
        assert self.process is not None
        try:
            proc = psutil.Process(self.process.pid)
            return [proc.pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM the main process and wait; then SIGKILL whatever is left of every process group."""
        proc = self.process
        if proc is None:
            return
        groups = {proc.pid} | self.extra_pgids
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    groups.add(os.getpgid(child.pid))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"  {self.name}: no exit 30 s after SIGTERM, killing", file=sys.stderr)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


class MgrServer(Server):
    name = "mgr"

    def start(self) -> None:
        a = self.args
        root = self.workdir / "mgr"
        self.env = dict(
            os.environ,
            MGR_HOST=f"127.0.0.1:{self.port}",
            MGR_MODELS=str(root / "models"),
            MGR_STATE_DIR=str(root / "state"),
            MGR_CONFIG=str(root / "config.toml"),
            MGR_NUM_PARALLEL=str(a.parallel),
            MGR_NUM_THREAD=str(a.threads),
            MGR_CONTEXT_LENGTH=str(a.ctx),
            MGR_KEEP_ALIVE="-1",
        )
        self.popen([sys.executable, "-m", "mgr.cli", "serve"], env=self.env)
        self.wait_http("/", 60)
        result = subprocess.run(
            [sys.executable, "-m", "mgr.cli", "create", "bench", "--from", str(a.model)],
            env=self.env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mgr create failed: {result.stderr}")
        self.model = "bench:latest"

    def warm(self) -> None:
        t = time.perf_counter()
        r = httpx.post(self.base_url + "/v1/chat/completions", timeout=600, json={
            "model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0,
        })
        r.raise_for_status()
        runners = self.runners()
        for p in runners:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                self.extra_pgids.add(os.getpgid(p.pid))
        cmd = " ".join(runners[0].cmdline()[2:]) if runners else "?"
        self.description = f"model loaded in {time.perf_counter() - t:.1f}s; runner: {cmd}"

    def runners(self) -> list[psutil.Process]:
        assert self.process is not None
        return [p for p in psutil.Process(self.process.pid).children(recursive=True)
                if "mgr.daemon.runners" in " ".join(p.cmdline())]


# The xllamacpp server runs in a child process of its own: its threads then never compete with this
# process's event loop, and a process group can be killed whatever state the server is in.
XLLAMACPP_CHILD = textwrap.dedent("""
    import json, signal, sys
    import xllamacpp as xlc
    cfg = json.loads(sys.argv[1])
    p = xlc.CommonParams()
    p.model.path = cfg["model"]
    p.n_parallel = cfg["parallel"]
    p.n_ctx = cfg["parallel"] * cfg["ctx"]  # llama-server's n_ctx is the total over all slots
    p.kv_unified = False  # one KV stream per slot, as mgr's runner does
    p.cpuparams.n_threads = cfg["threads"]
    p.cpuparams_batch.n_threads = cfg["threads"]
    p.hostnames = ["127.0.0.1"]
    p.port = cfg["port"]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = xlc.Server(p)
    print("listening", server.listening_address, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del server  # stops the HTTP server and the main loop
    print("stopped", flush=True)
""")


class XLlamaCppServer(Server):
    name = "xllamacpp"

    def start(self) -> None:
        a = self.args
        cfg = {"model": str(a.model), "parallel": a.parallel, "ctx": a.ctx, "threads": a.threads,
               "port": self.port}
        self.popen([sys.executable, "-c", XLLAMACPP_CHILD, json.dumps(cfg)])
        self.wait_http("/health", 300)
        import xllamacpp

        self.description = (f"xllamacpp {xllamacpp.__version__}: n_parallel={a.parallel}, "
                            f"n_ctx={a.parallel * a.ctx}, kv_unified=false, threads={a.threads}")


class LlamaCppPythonServer(Server):
    name = "llama_cpp.server"
    takes_ignore_eos = False

    def start(self) -> None:
        a = self.args
        argv = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(a.model), "--host", "127.0.0.1",
            "--port", str(self.port), "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
            "--n_ctx", str(a.ctx), "--flash_attn", "true",
            # its default (true) ends a streaming answer as soon as another request arrives
            "--interrupt_requests", "false",
        ]
        self.popen(argv, env=dict(os.environ, GGML_NO_BACKTRACE="1"))
        self.wait_http("/v1/models", 300)
        import llama_cpp

        self.description = f"llama-cpp-python {llama_cpp.__version__}: " + " ".join(argv[3:])


# --- clients --------------------------------------------------------------------------------------------

@dataclass
class Result:
    ttft: float | None = None  # seconds from send to the first non-empty content chunk
    finished: float = 0.0  # perf_counter at the end of the stream
    chunks: int = 0  # non-empty content chunks
    usage_tokens: int | None = None  # completion_tokens from usage, when the server sends it
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


def request_body(model: str, prompt: str, max_tokens: int, eos_ids: list[int],
                 cache_prompt: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,  # llama_cpp.server defaults to 1.1; the others to 1.0 (pure greedy everywhere)
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # llama-server, mgr's runner
        # for llama_cpp.server (no ignore_eos there; the caller passes no ids for the others)
        **({"logit_bias": {str(t): -100.0 for t in eos_ids}} if eos_ids else {}),
        # llama-server reuses a slot's cached prompt prefix (the system prompt, "Write a long story
        # about"); mgr's runner reuses only prompt parts decoded in 64-token pieces, which these short
        # prompts never are, so by default every server reads the whole prompt.
        "cache_prompt": cache_prompt,
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Result:
    result = Result()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    break
                if event.get("usage"):
                    result.usage_tokens = int(event["usage"].get("completion_tokens", 0))
                    result.prompt_tokens = int(event["usage"].get("prompt_tokens", 0))
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - t0
                        result.chunks += 1
                        result.text.append(content)
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.finished = time.perf_counter()
    return result


@dataclass
class Cell:
    server: str
    clients: int
    wall: float
    results: list[Result]
    cpu: dict[str, float]  # CPU seconds per process during the cell
    foreign_share: float = 0.0  # share of the machine's CPU used by processes outside the benchmark

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    @property
    def ttft_p50_ms(self) -> float:
        values = [r.ttft for r in self.results if r.ttft is not None]
        return statistics.median(values) * 1000 if values else float("nan")


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, steal seconds) since boot."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, getattr(t, "steal", 0.0)


def wait_for_idle(max_wait: float, threshold: float = 10.0) -> float:
    """Wait until the machine is quiet (other processes may share the cores): CPU use under `threshold`
    percent for 3 s in a row, at most `max_wait` seconds. Returns the last sampled percentage."""
    deadline = time.monotonic() + max_wait
    quiet = 0
    percent = psutil.cpu_percent(interval=1.0)
    announced = False
    while time.monotonic() < deadline:
        quiet = quiet + 1 if percent < threshold else 0
        if quiet >= 3:
            return percent
        if not announced and percent >= threshold:
            print(f"  waiting for the machine to be idle (CPU {percent:.0f}% used by other processes)", flush=True)
            announced = True
        percent = psutil.cpu_percent(interval=1.0)
    print(f"  warning: machine still busy ({percent:.0f}% CPU) after {max_wait:.0f}s; measuring anyway",
          flush=True)
    return percent


def cpu_times(pids: list[int]) -> dict[int, tuple[str, float]]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())
            label = ("runner" if "mgr.daemon.runners" in cmd else
                     "daemon" if "mgr.cli" in cmd else "server")
            out[pid] = (label, t.user + t.system)
    return out


async def measure_cell(server: Server, client: httpx.AsyncClient, args: argparse.Namespace,
                       eos_ids: list[int], prompts: list[str]) -> Cell:
    url = server.base_url + "/v1/chat/completions"
    eos_ids = [] if server.takes_ignore_eos else eos_ids
    # Warm-up: one request with a prompt no measured request uses.
    warm = await one_request(client, url, request_body(
        server.model, "Write a short poem about the sea.", 16, eos_ids, args.cache_prompt))
    if warm.error:
        raise RuntimeError(f"{server.name}: warm-up failed: {warm.error}")
    await asyncio.to_thread(wait_for_idle, args.idle_wait)
    pids = server.pids()
    before = cpu_times(pids)
    self_before = time.process_time()
    busy_before, steal_before = machine_busy()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        one_request(client, url, request_body(server.model, p, args.tokens, eos_ids, args.cache_prompt))
        for p in prompts
    ))
    wall = max(r.finished for r in results) - t0
    after = cpu_times(pids)
    busy_after, steal_after = machine_busy()
    cpu: dict[str, float] = {"bench client": time.process_time() - self_before}
    for pid, (label, t) in after.items():
        if pid in before:
            cpu[label] = cpu.get(label, 0.0) + t - before[pid][1]
    # CPU time the machine spent on anything but this benchmark (other users' processes).
    cpu["OTHER processes"] = max(0.0, (busy_after - busy_before) - sum(cpu.values()))
    cpu["steal"] = steal_after - steal_before
    for r in results:
        if r.error:
            raise RuntimeError(f"{server.name} with {len(prompts)} clients: {r.error}")
    return Cell(server.name, len(prompts), wall, list(results), cpu)


async def run_server(server: Server, args: argparse.Namespace, eos_ids: list[int]) -> list[Cell]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    cells = []
    capacity = psutil.cpu_count() or 1
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        offset = 0  # every server sees the same prompts: they depend on the cell only
        for n in args.clients:
            prompts = [f"Write a long story about {THINGS[(offset + i) % len(THINGS)]}." for i in range(n)]
            offset += n
            for attempt in range(args.retries + 1):
                cell = await measure_cell(server, client, args, eos_ids, prompts)
                foreign = cell.cpu["OTHER processes"] / (capacity * cell.wall)
                cell.foreign_share = foreign
                per_req = sorted(r.tokens for r in cell.results)
                print(f"  {server.name:17s} {n} clients: {cell.tok_s:6.1f} tok/s, TTFT p50 "
                      f"{cell.ttft_p50_ms:6.0f} ms, {cell.tokens} tokens (per request {per_req[0]}-{per_req[-1]}), "
                      f"wall {cell.wall:.2f}s, CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in cell.cpu.items()),
                      flush=True)
                if foreign <= args.max_foreign:
                    break
                if attempt < args.retries:
                    print(f"  other processes used {foreign:.0%} of the CPUs during that cell: measuring again",
                          flush=True)
            cells.append(cell)
            await asyncio.sleep(1.0)
    return cells


def make_server(name: str, args: argparse.Namespace, workdir: Path) -> Server:
    return {"mgr": MgrServer, "xllamacpp": XLlamaCppServer, "llama_cpp.server": LlamaCppPythonServer}[name](
        args, workdir)


def print_report(args: argparse.Namespace, cells: list[Cell], descriptions: dict[str, str]) -> None:
    print()
    print(f"Model: {args.model} ({args.model.stat().st_size / 2**20:.0f} MiB); threads {args.threads}; "
          f"slots {args.parallel}; max_tokens {args.tokens}; temperature 0; "
          f"{os.cpu_count()} CPUs; cache_prompt={str(args.cache_prompt).lower()}; one run.")
    for name, text in descriptions.items():
        print(f"- {name}: {text}")
    print()
    print("| server | clients | aggregate tok/s | TTFT p50 ms | tokens generated (per request min-max) "
          "| wall s | prompt tokens / request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        per_req = sorted(r.tokens for r in c.results)
        prompts = sorted(r.prompt_tokens for r in c.results if r.prompt_tokens is not None)
        prompt_text = f"{prompts[0]}-{prompts[-1]}" if prompts else "n/a"
        flag = f" (other load {c.foreign_share:.0%}!)" if c.foreign_share > args.max_foreign else ""
        print(f"| {c.server} | {c.clients} | {c.tok_s:.1f}{flag} | {c.ttft_p50_ms:.0f} | "
              f"{c.tokens} ({per_req[0]}-{per_req[-1]}) | {c.wall:.2f} | {prompt_text} |")
    by = {(c.server, c.clients): c for c in cells}
    print()
    print("| ratio | clients | value | target |")
    print("|---|---:|---:|---:|")
    for n in args.clients:
        if ("mgr", n) in by and ("xllamacpp", n) in by:
            ratio = by["mgr", n].tok_s / by["xllamacpp", n].tok_s
            print(f"| mgr / xllamacpp aggregate tok/s | {n} | {ratio:.2f} | >= 0.95 "
                  f"{'(met)' if ratio >= 0.95 else '(MISSED)'} |")
    top = max(args.clients)
    if ("mgr", top) in by and ("llama_cpp.server", top) in by:
        ratio = by["mgr", top].tok_s / by["llama_cpp.server", top].tok_s
        target = " >= 2.5 " + ("(met)" if ratio >= 2.5 else "(MISSED)") if top == 8 else " (target is at 8)"
        print(f"| mgr / llama_cpp.server aggregate tok/s | {top} | {ratio:.2f} |{target} |")
    # Same prompts, greedy: how often do two servers produce the same text? mgr and llama_cpp.server share
    # llama-cpp-python's llama.cpp build, so they should agree; xllamacpp carries its own llama.cpp build
    # whose numerics differ enough to change a greedy choice of this small model within a few tokens.
    names = [s for s in SERVERS if any(c.server == s for c in cells)]
    for i, a_name in enumerate(names):
        for b_name in names[i + 1:]:
            same = total = 0
            for n in args.clients:
                if (a_name, n) in by and (b_name, n) in by:
                    for a, b in zip(by[a_name, n].results, by[b_name, n].results):
                        total += 1
                        same += "".join(a.text) == "".join(b.text)
            if total:
                print(f"\n{a_name} and {b_name} produced identical text for {same} of {total} requests.", end="")
    print()
    print(f"\nCPU seconds per process during each cell ({psutil.cpu_count()} CPUs => at most "
          f"{psutil.cpu_count()} x wall; 'OTHER processes' is load from outside this benchmark):")
    for c in cells:
        print(f"- {c.server} x{c.clients} (wall {c.wall:.2f}s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in c.cpu.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrent client counts")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of every measured request")
    p.add_argument("--model", type=Path, default=Path(os.environ.get("MGR_TEST_GGUF", DEFAULT_GGUF)))
    p.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8, help="slots of mgr and llama-server")
    p.add_argument("--ctx", type=int, default=4096, help="context per slot, in tokens")
    p.add_argument("--idle-wait", type=float, default=300.0,
                   help="before each cell, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--max-foreign", type=float, default=0.02,
                   help="measure a cell again when other processes took more than this share of the CPUs")
    p.add_argument("--retries", type=int, default=5, help="at most this many re-measurements per cell")
    p.add_argument("--cache-prompt", action="store_true",
                   help="let llama-server reuse cached prompt prefixes (its default; mgr's runner reuses no part "
                        "of these short prompts)")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (path printed)")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",") if x.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}")
    if not args.model.is_file():
        p.error(f"model {args.model} not found (set MGR_TEST_GGUF or --model)")
    if max(args.clients) > args.parallel:
        print(f"note: {max(args.clients)} clients > {args.parallel} slots; some requests will queue",
              file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eos_ids = gguf_eos_ids(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="mgr-bench-"))
    cells: list[Cell] = []
    descriptions: dict[str, str] = {}
    ok = True
    try:
        for name in args.servers:
            server = make_server(name, args, workdir)
            print(f"{name}: starting", flush=True)
            try:
                server.start()
                server.warm()
                descriptions[name] = server.description
                print(f"  {server.description}", flush=True)
                cells += asyncio.run(run_server(server, args, eos_ids))
            except Exception as e:  # report and go on with the next server
                ok = False
                print(f"  {name} FAILED: {e}", file=sys.stderr, flush=True)
            finally:
                server.stop()
                time.sleep(2)  # let the cores settle before the next server
        print_report(args, cells, descriptions)
    finally:
        leftovers = [p for p in psutil.Process().children(recursive=True)]
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                print(f"warning: leftover process {p.pid} {' '.join(p.cmdline())[:120]}; killing it",
                      file=sys.stderr)
                p.kill()
        if args.keep_logs:
            print(f"\nlogs: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
