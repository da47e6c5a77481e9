"""Benchmark: the scheduler's added latency, and admission / queue bound / eviction under load.

Not a pytest test. Run:

    .venv/bin/python tests/bench/bench_scheduler.py [--part all|fast|e2e|stress] [--requests 2000] [--clients 64]

(a) Added latency.
    fast:   in-process, a Scheduler over a store with one model whose runner is the STAND-IN (tests/standin/),
            loaded once; then --iterations x (try_acquire + release), each timed with perf_counter_ns on the
            daemon's own code path (release included: it re-arms the keep-alive timer and looks for loads to
            start). Reports p50/p99 in microseconds. Target: p50 <= 0.5 ms.
    e2e:    a real daemon and the real SmolLM2 GGUF on the real llama.cpp runner; --e2e-requests sequential tiny
            requests (/v1/chat/completions, max_tokens 1, temperature 0, stream false) straight to the runner's
            port (found in its command line, `--port N`) and the same through the daemon, interleaved pair by
            pair (the order flips every pair) so that drift on a shared machine hits both sides alike. Reports
            the p50 of each side, their difference, and the p50 of the per-pair difference.
(b) stress: --requests /api/generate requests (stream false) from --clients concurrent clients over three models
            (smollm2 and its copies smol-b, smol-c: three runners) with MGR_MAX_LOADED_MODELS=2,
            MGR_MAX_QUEUE=32, MGR_NUM_PARALLEL=4. Request k asks for model k mod 3, so all three are always in
            demand and the scheduler has to evict. The requests are as cheap as the engine allows (raw prompt
            of a few tokens, num_predict 1; --chat and --num-predict make them dearer): the point is admission,
            the queue bound and eviction, not generation speed. Each request has a --timeout (120 s); one that
            runs into it counts as a hang. A 503 must carry Retry-After; the client then waits
            --backoff seconds (default: what Retry-After says) before its next request. While it runs, /api/ps,
            /api/queue and the daemon's runner processes are sampled every 100 ms. Afterwards /api/queue must
            show active = queued = 0 for every model.

Prints the numbers of one run, then a Markdown summary with the targets; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # conftest.Daemon (a real `mgr serve`) and standin/ (the stand-in runner)

from conftest import DEFAULT_GGUF, Daemon, DaemonSampler  # noqa: E402
from fakehub import import_file  # noqa: E402
from standin.factory import StandinFactory  # noqa: E402
from standin.gpus import StaticGpus  # noqa: E402

from mgr.daemon.scheduler import Scheduler  # noqa: E402
from mgr.registry.config import Settings  # noqa: E402
from mgr.registry.store import Store  # noqa: E402

FAST_PATH_TARGET_MS = 0.5
STRESS_MODELS = ("smollm2", "smol-b", "smol-c")
HOLDING_STATES = {"loading", "ready", "waking", "sleeping", "unloading"}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values; nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def machine() -> str:
    load = os.getloadavg()
    return (f"{psutil.cpu_count(logical=True)} logical / {psutil.cpu_count(logical=False)} physical cores, "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, Python {sys.version.split()[0]}")


def runner_port(daemon: Daemon) -> int:
    for pid in daemon.runner_pids():
        argv = psutil.Process(pid).cmdline()
        if "--port" in argv:
            return int(argv[argv.index("--port") + 1])
    raise RuntimeError("no runner process with --port found")


from test_scheduler_policy import write_tiny_gguf  # noqa: E402  (the tests' minimal valid GGUF)


# (a) fast path, in process ---------------------------------------------------------------------------------
async def fast_path(root: Path, iterations: int) -> dict[str, Any]:
    store = Store(root / "models")
    write_tiny_gguf(root / "bench.gguf", "bench")
    store.create("bench", files={"bench.gguf": import_file(store, root / "bench.gguf")}, source={"bench": "stand-in"})
    settings = Settings(models_dir=store.root, state_dir=root / "state")
    factory = StandinFactory(settings)
    scheduler = Scheduler(settings, store, factory, gpus=StaticGpus([]))
    try:
        (await scheduler.acquire("bench")).release()  # the one load
        assert len(factory.runners) == 1
        clock = time.perf_counter_ns
        both, acquire, release = [], [], []
        for i in range(iterations + 1000):  # the first 1000 warm up
            t0 = clock()
            lease = scheduler.try_acquire("bench")
            t1 = clock()
            assert lease is not None, "the fast path refused a READY model with free slots"
            lease.release()
            t2 = clock()
            if i >= 1000:
                both.append((t2 - t0) / 1000)
                acquire.append((t1 - t0) / 1000)
                release.append((t2 - t1) / 1000)
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the loop run (and drop cancelled keep-alive timers), as it would
        assert len(factory.runners) == 1, "the fast path started a runner"
    finally:
        await scheduler.shutdown()
    overhead = min(-(clock() - clock()) for _ in range(1000)) / 1000  # one perf_counter_ns call, in us
    return {"n": iterations, "p50_us": pct(both, 50), "p99_us": pct(both, 99), "max_us": max(both),
            "acquire_p50_us": pct(acquire, 50), "release_p50_us": pct(release, 50), "timer_us": overhead}


# (a) end to end, direct vs through the daemon --------------------------------------------------------------
def end_to_end(root: Path, gguf: Path, requests: int) -> dict[str, Any]:
    root.mkdir(parents=True)
    daemon = Daemon(root, {"MGR_MAX_LOADED_MODELS": "1", "MGR_KEEP_ALIVE": "-1"})
    daemon.start()
    try:
        created = daemon.cli("create", "smollm2", "--from", str(gguf))
        assert created.returncode == 0, created.stderr
        body = {"model": "smollm2:latest", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "temperature": 0, "stream": False}
        through = httpx.Client(base_url=daemon.base_url, timeout=120, trust_env=False)
        through.post("/v1/chat/completions", json=body).raise_for_status()  # loads the model
        direct = httpx.Client(base_url=f"http://127.0.0.1:{runner_port(daemon)}", timeout=120, trust_env=False)
        for _ in range(5):  # warm both connections and the runner's prompt cache
            direct.post("/v1/chat/completions", json=body).raise_for_status()
            through.post("/v1/chat/completions", json=body).raise_for_status()
        times: dict[str, list[float]] = {"direct": [], "daemon": []}
        clients = {"direct": direct, "daemon": through}
        for i in range(requests):
            for side in (("direct", "daemon") if i % 2 == 0 else ("daemon", "direct")):
                t0 = time.perf_counter()
                response = clients[side].post("/v1/chat/completions", json=body)
                times[side].append((time.perf_counter() - t0) * 1000)
                response.raise_for_status()
                assert response.json()["usage"]["completion_tokens"] == 1
        direct.close()
        through.close()
    finally:
        daemon.stop()
    diffs = [b - a for a, b in zip(times["direct"], times["daemon"])]
    return {"n": requests, "direct_p50": pct(times["direct"], 50), "daemon_p50": pct(times["daemon"], 50),
            "direct_p90": pct(times["direct"], 90), "daemon_p90": pct(times["daemon"], 90),
            "added_p50": pct(times["daemon"], 50) - pct(times["direct"], 50), "pair_diff_p50": pct(diffs, 50)}


# (b) stress -------------------------------------------------------------------------------------------------
class Sampler(DaemonSampler):
    """Every `interval`: /api/ps, /api/queue and the runner processes; keeps maxima and the bound violations."""

    def __init__(self, daemon: Daemon, max_loaded: int, max_queue: int, interval: float = 0.1) -> None:
        super().__init__(daemon, interval)
        self.max_loaded, self.max_queue = max_loaded, max_queue
        self.max_queued = 0
        self.max_holding = 0
        self.max_processes = 0
        self.pids: set[int] = set()
        self.loaded_sets: list[tuple[str, ...]] = []  # each change of which models are ready
        self.violations: list[str] = []

    def sample(self, client: httpx.Client) -> None:
        pids = self.target.runner_pids()
        ps = client.get("/api/ps").json()["models"]
        queue = client.get("/api/queue").json()
        self.pids.update(pids)
        holding = [m["name"] for m in ps if m["state"] in HOLDING_STATES]
        ready = tuple(sorted(m["name"] for m in ps if m["state"] == "ready"))
        if not self.loaded_sets or self.loaded_sets[-1] != ready:
            self.loaded_sets.append(ready)
        self.max_queued = max(self.max_queued, queue["queued"])
        self.max_holding = max(self.max_holding, len(holding))
        self.max_processes = max(self.max_processes, len(pids))
        now = time.strftime("%X")
        if queue["queued"] > self.max_queue:
            self.violations.append(f"{now}: {queue['queued']} queued > max_queue {self.max_queue}")
        if len(holding) > self.max_loaded:
            self.violations.append(f"{now}: {len(holding)} instances hold runners: {holding}")
        if len(pids) > self.max_loaded:
            self.violations.append(f"{now}: {len(pids)} runner processes {pids}")
        for m in queue["models"]:
            if m["active"] > m["num_parallel"]:
                self.violations.append(f"{now}: {m['name']} has {m['active']} active > {m['num_parallel']}")


async def stress_clients(base_url: str, requests: int, clients: int, body_for, timeout: float,
                         backoff: float | None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, trust_env=False) as http:
        async def worker() -> None:
            for k in counter:
                model = STRESS_MODELS[k % len(STRESS_MODELS)]
                record: dict[str, Any] = {"k": k, "model": model}
                t0 = time.perf_counter()
                try:
                    response = await http.post("/api/generate", json=body_for(model))
                    record["status"] = response.status_code
                    if response.status_code == 200:
                        record["ok"] = bool(response.json().get("done"))
                    elif response.status_code == 503:
                        record["retry_after"] = response.headers.get("retry-after")
                    else:
                        record["body"] = response.text[:300]
                except httpx.TimeoutException:
                    record["status"] = "hang"
                except httpx.HTTPError as e:
                    record["status"] = f"error:{type(e).__name__}"
                record["latency"] = time.perf_counter() - t0
                results.append(record)
                if record["status"] == 503:
                    wait = backoff if backoff is not None else float(record.get("retry_after") or 1)
                    await asyncio.sleep(wait)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def stress(root: Path, gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    max_loaded, max_queue = 2, 32
    root.mkdir(parents=True)
    daemon = Daemon(root, {"MGR_MAX_LOADED_MODELS": str(max_loaded), "MGR_MAX_QUEUE": str(max_queue),
                           "MGR_NUM_PARALLEL": "4"})
    daemon.start()
    try:
        created = daemon.cli("create", "smollm2", "--from", str(gguf))
        assert created.returncode == 0, created.stderr
        for copy in STRESS_MODELS[1:]:
            copied = daemon.cli("cp", "smollm2", copy)
            assert copied.returncode == 0, copied.stderr
        options = {"temperature": 0, "num_predict": args.num_predict}

        def body_for(model: str) -> dict[str, Any]:
            if args.chat:
                return {"model": model, "prompt": "What is the capital of France?", "stream": False,
                        "options": options}
            return {"model": model, "prompt": "The capital of France is", "raw": True, "stream": False,
                    "options": options}

        sampler = Sampler(daemon, max_loaded, max_queue)
        sampler.start()
        started = time.monotonic()
        try:
            results = asyncio.run(stress_clients(daemon.base_url, args.requests, args.clients, body_for,
                                                 args.timeout, args.backoff))
        finally:
            wall = time.monotonic() - started
            sampler.stop_event.set()
            sampler.join(timeout=15)
        after_queue = httpx.get(daemon.base_url + "/api/queue", timeout=10, trust_env=False).json()
        after_ps = httpx.get(daemon.base_url + "/api/ps", timeout=10, trust_env=False).json()["models"]
        after_pids = daemon.runner_pids()
    finally:
        daemon.stop()
    log = daemon.log_path.read_text()
    statuses = collections.Counter(str(r["status"]) for r in results)
    by_model = {m: collections.Counter(str(r["status"]) for r in results if r["model"] == m) for m in STRESS_MODELS}
    ok = [r["latency"] * 1000 for r in results if r["status"] == 200]
    busy = [r["latency"] * 1000 for r in results if r["status"] == 503]
    return {
        "requests": len(results), "clients": args.clients, "wall": wall, "statuses": statuses, "by_model": by_model,
        "latency_all": [r["latency"] * 1000 for r in results], "latency_ok": ok, "latency_503": busy,
        "latency_ok_by_model": {m: [r["latency"] * 1000 for r in results if r["status"] == 200 and r["model"] == m]
                                for m in STRESS_MODELS},
        "bad_200": sum(1 for r in results if r["status"] == 200 and not r.get("ok")),
        "no_retry_after": sum(1 for r in results if r["status"] == 503 and not r.get("retry_after")),
        "others": [r for r in results if r["status"] not in (200, 503)][:10],
        "loads": collections.Counter(re.findall(r"mgr\.scheduler: (\S+): loading on", log)),
        "evictions": len(re.findall(r"mgr\.scheduler: \S+: .*to make room", log)),  # evicted, or unloaded asleep
        "unloads": len(re.findall(r"mgr\.scheduler: \S+: unloaded", log)),
        "failures": len(re.findall(r"load failed|exited unexpectedly|unexpected error", log)),
        "sampler": sampler, "after_queue": after_queue, "after_ps": after_ps, "after_pids": after_pids,
        "log_path": daemon.log_path,
    }


# report -----------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "fast", "e2e", "stress"), default="all")
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("MGR_TEST_GGUF", DEFAULT_GGUF)))
    parser.add_argument("--iterations", type=int, default=10_000, help="fast path: try_acquire + release pairs")
    parser.add_argument("--e2e-requests", type=int, default=200, help="sequential requests per side")
    parser.add_argument("--requests", type=int, default=2000, help="stress: requests in all")
    parser.add_argument("--clients", type=int, default=64, help="stress: concurrent clients")
    parser.add_argument("--num-predict", type=int, default=1, help="stress: tokens per request")
    parser.add_argument("--chat", action="store_true", help="stress: a chat-templated prompt instead of a raw one")
    parser.add_argument("--timeout", type=float, default=120.0, help="stress: per request; past it = a hang")
    parser.add_argument("--backoff", type=float, default=None,
                        help="stress: seconds a client waits after a 503 (default: its Retry-After)")
    parser.add_argument("--keep", action="store_true", help="keep the daemons' folders (logs) afterwards")
    args = parser.parse_args()
    if args.part in ("all", "e2e", "stress") and not args.model.is_file():
        print(f"the model {args.model} is missing (set MGR_TEST_GGUF or --model)", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    print(f"# bench_scheduler\n\nmachine: {machine()}\nwork folder: {root}\n")
    rows: list[tuple[str, str, str, bool | None]] = []
    failed = False

    if args.part in ("all", "fast"):
        fast = asyncio.run(fast_path(root / "fast", args.iterations))
        print(f"## (a) fast path in process: {fast['n']} x (try_acquire + release), stand-in runner")
        print(f"p50 {fast['p50_us']:.2f} us, p99 {fast['p99_us']:.2f} us, max {fast['max_us']:.1f} us "
              f"(try_acquire p50 {fast['acquire_p50_us']:.2f} us, release p50 {fast['release_p50_us']:.2f} us; "
              f"perf_counter_ns overhead {fast['timer_us']:.3f} us)\n")
        passed = fast["p50_us"] / 1000 <= FAST_PATH_TARGET_MS
        rows.append(("scheduler fast path (try_acquire + release) p50", f"<= {FAST_PATH_TARGET_MS} ms",
                     f"{fast['p50_us'] / 1000:.4f} ms (p99 {fast['p99_us'] / 1000:.4f} ms)", passed))
        failed |= not passed

    if args.part in ("all", "e2e"):
        e2e = end_to_end(root / "e2e", args.model, args.e2e_requests)
        print(f"## (a) end to end: {e2e['n']} sequential /v1/chat/completions (max_tokens 1) per side, interleaved")
        print(f"runner direct p50 {e2e['direct_p50']:.2f} ms (p90 {e2e['direct_p90']:.2f}); through the daemon "
              f"p50 {e2e['daemon_p50']:.2f} ms (p90 {e2e['daemon_p90']:.2f})")
        print(f"added by the daemon: {e2e['added_p50']:+.2f} ms (difference of p50s), "
              f"{e2e['pair_diff_p50']:+.2f} ms (p50 of per-pair differences)\n")
        rows.append(("daemon's added latency end to end, p50", "(reported)",
                     f"{e2e['added_p50']:+.2f} ms (per-pair {e2e['pair_diff_p50']:+.2f} ms; "
                     f"direct {e2e['direct_p50']:.1f} ms)", None))

    if args.part in ("all", "stress"):
        s = stress(root / "stress", args.model, args)
        sampler: Sampler = s["sampler"]
        kind = "chat prompt" if args.chat else "raw prompt"
        print(f"## (b) stress: {s['requests']} x /api/generate ({kind}, num_predict {args.num_predict}) from "
              f"{s['clients']} clients over {len(STRESS_MODELS)} models; max_loaded 2, max_queue 32, num_parallel 4")
        print(f"wall {s['wall']:.1f} s, {s['requests'] / s['wall']:.1f} requests/s")
        print("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items())))
        for model, counts in s["by_model"].items():
            waits = s["latency_ok_by_model"][model]
            print(f"  {model}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                  + f"; 200 latency p50 {pct(waits, 50):.0f} ms, p99 {pct(waits, 99):.0f} ms, "
                    f"max {max(waits, default=float('nan')):.0f} ms")
        print(f"latency all    p50 {pct(s['latency_all'], 50):.0f} ms, p99 {pct(s['latency_all'], 99):.0f} ms, "
              f"max {max(s['latency_all']):.0f} ms")
        print(f"latency 200    p50 {pct(s['latency_ok'], 50):.0f} ms, p99 {pct(s['latency_ok'], 99):.0f} ms")
        print(f"latency 503    p50 {pct(s['latency_503'], 50):.1f} ms, p99 {pct(s['latency_503'], 99):.1f} ms; "
              f"503s without Retry-After: {s['no_retry_after']}")
        loads = sum(s["loads"].values())
        print(f"loads {loads} ({', '.join(f'{k} {v}' for k, v in sorted(s['loads'].items()))}), "
              f"evictions {s['evictions']}, unloads {s['unloads']}, load failures/crashes {s['failures']}; "
              f"distinct runner pids seen {len(sampler.pids)}")
        print(f"sampled {sampler.samples}x: max queued {sampler.max_queued} (bound 32), max instances holding a "
              f"runner {sampler.max_holding} (bound 2), max runner processes {sampler.max_processes}; "
              f"ready-set changes {len(sampler.loaded_sets) - 1}; sampler errors {len(sampler.errors)}")
        if sampler.violations:
            print("bound violations:\n  " + "\n  ".join(sampler.violations[:20]))
        if s["others"]:
            print("unexpected outcomes (first 10):")
            for r in s["others"]:
                print(f"  {r}")
        print(f"after: /api/queue {s['after_queue']}")
        print(f"after: runner processes {len(s['after_pids'])}, /api/ps "
              f"{[(m['name'], m['state'], m['active'], m['queued']) for m in s['after_ps']]}\n")

        statuses = s["statuses"]
        hangs = statuses.get("hang", 0)
        unexpected = sum(v for k, v in statuses.items() if k not in ("200", "503"))
        answered = s["requests"] == args.requests and unexpected == 0 and s["bad_200"] == 0 \
            and s["no_retry_after"] == 0
        rows.append(("every request ends in an answer (200) or a 503 with Retry-After",
                     "all", f"200: {statuses.get('200', 0)}, 503: {statuses.get('503', 0)}, "
                            f"other: {unexpected - hangs}, of {s['requests']}", answered))
        rows.append(("no request hangs", f"0 past {args.timeout:.0f} s", f"{hangs} (max latency "
                     f"{max(s['latency_all']) / 1000:.1f} s)", hangs == 0))
        idle = s["after_queue"]["queued"] == 0 and all(
            m["active"] == 0 and m["queued"] == 0 for m in s["after_queue"]["models"])
        rows.append(("afterwards active = queued = 0 (/api/queue)", "0 / 0",
                     ", ".join(f"{m['name']} {m['active']}/{m['queued']}" for m in s["after_queue"]["models"])
                     or "no models", idle))
        bounded = not sampler.violations and sampler.samples > 0
        rows.append(("bounds while running: queued <= 32, runners <= 2, active <= num_parallel", "never exceeded",
                     f"max queued {sampler.max_queued}, max holding {sampler.max_holding}, "
                     f"max processes {sampler.max_processes}", bounded))
        rows.append(("loads / evictions under load", "(reported)", f"{loads} loads, {s['evictions']} evictions, "
                     f"{s['failures']} failures", None))
        failed |= not (answered and hangs == 0 and idle and bounded)
        if not (answered and hangs == 0 and idle and bounded):
            args.keep = True
            print(f"daemon log kept: {s['log_path']}\n")

    print("## Summary\n")
    print("| check | target | measured | result |")
    print("|---|---|---|---|")
    for check, target, measured, passed in rows:
        result = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        print(f"| {check} | {target} | {measured} | {result} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
