"""Runners never outlive the daemon: a SIGKILLed daemon's llama.cpp runner is gone (its parent-death signal),
and a runner left alive by a daemon that did not stop it is stopped by the next daemon at start, by its
record (pid and start time), while a recorded pid now used by another process is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
from conftest import Daemon, wait_for
from serving import wait_until_serving

from mgr.daemon import leftovers

MODEL = "smollm2:latest"


def records(root: Path) -> Path:
    return leftovers.records_dir(root / "state" / "runners")


def test_a_runner_is_recorded_while_it_runs_and_gone_with_a_killed_daemon(tmp_path: Path, gguf_path: Path) -> None:
    root = tmp_path
    daemon = Daemon(root)
    daemon.start()
    try:
        assert daemon.cli("create", "smollm2", "--from", str(gguf_path)).returncode == 0
        answer = httpx.post(daemon.base_url + "/api/generate", timeout=120,
                            json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
        assert answer.status_code == 200
        [runner] = daemon.runner_pids()
        entry = json.loads((records(root) / f"{runner}.json").read_text())
        assert entry["pid"] == runner and entry["model"] == MODEL
        assert abs(entry["start_time"] - psutil.Process(runner).create_time()) < 0.5

        # An unload removes the record with the runner.
        httpx.post(daemon.base_url + "/api/generate", timeout=60, json={"model": MODEL, "keep_alive": 0})
        assert wait_for(lambda: not psutil.pid_exists(runner) and not list(records(root).glob("*.json")), 30)

        httpx.post(daemon.base_url + "/api/generate", timeout=120, json={"model": MODEL, "prompt": "Hi",
                   "stream": False, "options": {"num_predict": 2}})
        [runner] = daemon.runner_pids()
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        assert wait_for(lambda: not _alive(runner), 10), "the runner outlived its SIGKILLed daemon"
        assert (records(root) / f"{runner}.json").exists()  # nobody was left to remove it

        daemon.start()  # the next daemon finds the record, the process is gone: the record goes
        assert not list(records(root).glob("*.json"))
    finally:
        daemon.stop()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_next_daemon_stops_a_leftover_runner(tmp_path: Path, gguf_path: Path) -> None:
    """A real llama.cpp runner that no daemon stops (started as the daemon starts runners, in its own session,
    but without a parent-death signal), recorded as a daemon records it; and a recorded pid that is now another
    process (another start time)."""
    root = tmp_path
    port = _free_port()
    log = (root / "runner.log").open("wb")
    runner = subprocess.Popen([sys.executable, "-m", "mgr.daemon.runners.llama", "--model", str(gguf_path),
                               "--port", str(port), "--threads", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health", runner, 90)
        leftovers.record(records(root), runner.pid, MODEL)
        stale = records(root) / f"{bystander.pid}.json"
        stale.write_text(json.dumps({"pid": bystander.pid, "start_time": psutil.Process(bystander.pid).create_time()
                                     - 3600, "model": "recycled:latest"}))

        daemon = Daemon(root)
        daemon.start()  # answers only once its start-up (which stops leftovers) is done
        try:
            # signalled during the start-up; its exit (a 260 MB process under CI's load) can trail the daemon's
            # first answer by a moment
            assert wait_for(lambda: runner.poll() is not None, timeout=10), "the leftover runner still runs"
            assert runner.returncode in (0, -signal.SIGTERM)  # asked to stop (SIGTERM), and it did
            assert bystander.poll() is None, "a process that only has a recorded pid was signalled"
            assert not list(records(root).glob("*.json"))
            text = daemon.log_path.read_text()
            assert f"stopped runner {runner.pid} ({MODEL})" in text
            assert "recycled" not in text
        finally:
            daemon.stop()
    finally:
        for process in (runner, bystander):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
