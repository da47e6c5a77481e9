"""The scheduler against real llama.cpp runners: two models (the SmolLM2 GGUF as `smollm2`, and `smol-b`: the same
file with its chat template given at create, so another runner) behind MGR_MAX_LOADED_MODELS=1, and 8 concurrent
clients that alternate between them. Every request must be answered correctly, and at no moment may two runners exist.

How "never two runners" is checked, without flakiness and without looking away from a real violation:

* Processes. The scheduler starts a new runner only after the evicted one has been reaped (`_unload` awaits
  the process's exit, and a slot counts as taken while its instance is in `unloading`), so there is no
  window in which an old runner is legitimately still alive next to a new one. A sampler counts the daemon's
  runner processes every ~50 ms and the bound is strict: at most 1 process that is not a zombie (a zombie has
  exited and holds no memory; it is only waiting to be reaped). Processes that vanish between listing and
  inspection are skipped, not counted.
* Scheduler state. The same sampler reads /api/ps, which lists every instance including those still
  unloading. Counted are the states that hold a runner or are about to: loading, ready, waking, sleeping and
  unloading. The scheduler's invariant is live + unloading <= max_loaded_models, so this too is at most 1.
* The checks are not vacuous: the run must have switched runners (at least 2 distinct runner pids, at least
  2 loads in the daemon log), and the sampler must have taken many samples while the clients ran.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import QUESTION, Daemon, DaemonSampler

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODELS = ("smollm2", "smol-b")
CLIENTS = 8
REQUESTS_PER_CLIENT = 3
SAMPLE_INTERVAL = 0.05
HOLDING_STATES = {"loading", "ready", "waking", "sleeping", "unloading"}


@pytest.fixture(scope="module")
def one_slot_daemon(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("mgr-sched"), {"MGR_MAX_LOADED_MODELS": "1", "MGR_KEEP_ALIVE": "5m"})
    daemon.start()
    try:
        created = daemon.cli("create", "smollm2", "--from", str(gguf_path))
        assert created.returncode == 0, created.stderr
        # the same file with its own (equal) chat template: another load, so another runner (a plain `mgr cp`
        # alias would share smollm2's runner)
        template = httpx.post(daemon.base_url + "/api/show", json={"model": "smollm2"}).json()["template"]
        copied = httpx.post(daemon.base_url + "/api/create", timeout=60,
                            json={"model": "smol-b", "from": "smollm2", "template": template, "stream": False})
        assert copied.status_code == 200, copied.text
        yield daemon
    finally:
        daemon.stop()


class Sampler(DaemonSampler):
    """Every SAMPLE_INTERVAL: the live runner processes and the /api/ps states; keeps the worst moments."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon, SAMPLE_INTERVAL)
        self.max_processes = 0
        self.max_holding = 0
        self.max_live = 0  # loading/ready/waking only
        self.pids_seen: set[int] = set()
        self.violations: list[str] = []

    def sample(self, client: httpx.Client) -> None:
        pids = self.target.runner_pids()
        models = client.get("/api/ps").json()["models"]
        self.pids_seen.update(pids)
        holding = [(m["name"], m["state"]) for m in models if m["state"] in HOLDING_STATES]
        live = [m for m in models if m["state"] in ("loading", "ready", "waking")]
        self.max_processes = max(self.max_processes, len(pids))
        self.max_holding = max(self.max_holding, len(holding))
        self.max_live = max(self.max_live, len(live))
        if len(pids) > 1:
            self.violations.append(f"{time.strftime('%X')}: {len(pids)} live runner processes {pids}")
        if len(holding) > 1:
            self.violations.append(f"{time.strftime('%X')}: /api/ps lists {holding}")


def ask(base_url: str, client_index: int) -> list[tuple[str, int, str]]:
    """One client: REQUESTS_PER_CLIENT chat requests, alternating between the two models."""
    answers = []
    with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as client:
        for j in range(REQUESTS_PER_CLIENT):
            model = MODELS[(client_index + j) % len(MODELS)]
            response = client.post("/api/chat", json={
                "model": model, "stream": False, "messages": [{"role": "user", "content": QUESTION}],
                "options": {"temperature": 0, "num_predict": 16},
            })
            body: Any = response.json()
            content = body.get("message", {}).get("content", "") if response.status_code == 200 else str(body)
            answers.append((model, response.status_code, content))
    return answers


def test_one_runner_at_a_time_under_concurrency(one_slot_daemon: Daemon) -> None:
    daemon = one_slot_daemon
    sampler = Sampler(daemon)
    sampler.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [a for answers in pool.map(lambda i: ask(daemon.base_url, i), range(CLIENTS)) for a in answers]
    finally:
        sampler.stop_event.set()
        sampler.join(timeout=15)
    elapsed = time.monotonic() - started

    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    wrong = [r for r in results if r[1] != 200 or "Paris" not in r[2]]
    assert not wrong, f"requests without a correct answer: {wrong}"

    # The bound held at every sample, and the samples cover the run.
    assert not sampler.errors, sampler.errors[:5]
    assert not sampler.violations, "\n".join(sampler.violations[:20])
    assert sampler.max_processes <= 1 and sampler.max_holding <= 1 and sampler.max_live <= 1
    assert sampler.samples >= min(20, elapsed / SAMPLE_INTERVAL / 4), (sampler.samples, elapsed)

    # Not vacuous: the models really took turns on the one slot.
    log = daemon.log_path.read_text()
    loads = re.findall(r"mgr\.scheduler: (\S+): loading on", log)
    assert {f"{m}:latest" for m in MODELS} <= set(loads), loads
    assert len(sampler.pids_seen) >= 2, sampler.pids_seen
    assert "load failed" not in log and "exited unexpectedly" not in log

    # Afterwards nothing is in flight or waiting (leases are released before a non-streamed answer is sent).
    queue = httpx.get(daemon.base_url + "/api/queue", timeout=10, trust_env=False).json()
    assert queue["queued"] == 0, queue
    assert all(m["active"] == 0 and m["queued"] == 0 for m in queue["models"]), queue
    assert len(daemon.runner_pids()) <= 1
    print(f"\n{len(results)} answers in {elapsed:.1f}s; {len(loads)} loads; {sampler.samples} samples; "
          f"max runner processes {sampler.max_processes}, max holding instances {sampler.max_holding}")
