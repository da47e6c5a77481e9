"""vLLM on a Ray cluster through mgr (issue 22), on the two-GPU machine: a Ray head and a worker started as two
Ray nodes of one GPU each (CUDA_VISIBLE_DEVICES=0 and =1), the real vLLM placed by mgr over both through Ray.
Runs after ../shared/gpu/unpack.sh, the Ray bundle unpacked into /tmp/ray-site, and `source tests/gpu/env.sh`:

    PYTHONPATH=/tmp/ray-site:$PYTHONPATH python3 tests/gpu/ray_check.py /tmp/smollm2-st

It is the README's multi-machine recipe on one host: `ray start --head` on one machine, `ray start --address`
on the other, MGR_RAY_ADDRESS for the daemon, and `ray_gpus = 2` for a model small enough for one GPU (a model
too big for one machine goes to the cluster by itself). Checks (PASS/FAIL, all run, exit 1 if any failed): the
daemon's reading of the cluster (2 nodes, 1 GPU each); the model starts with --distributed-executor-backend ray
over 2 GPUs (pipeline parallel 2 x tensor parallel 1) and answers through /api/chat and /v1/chat/completions;
/api/ps and `mgr ps` show the Ray placement; memory is held on both GPUs; a Ray worker killed -9 is seen as a crash
and the next request reloads and answers; unloading returns both GPUs' memory; `ray stop` leaves nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pynvml
from harness import FAILED, Daemon, check, flag, gpu_holders, say, section, skip_unless, used_mib, wait

from mgr.daemon.ray_cluster import read_cluster

ROOT = Path(os.environ.get("MGR_GPU_ROOT", "/tmp/mgr-ray"))
RAY_PORT = 6380
ADDRESS = f"127.0.0.1:{RAY_PORT}"
CONFIG = '[models."smol-ray:latest"]\nray_gpus = 2\nvllm_args = ["--enforce-eager"]\n'


def ray(*args: str, gpu: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, NCCL_NVLS_ENABLE="0")
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, timeout=180, cwd="/tmp")


def main(folder: str) -> None:
    pynvml.nvmlInit()
    baseline = [used_mib(i) for i in range(2)]
    head = ray("start", "--head", f"--port={RAY_PORT}", "--num-gpus=1", "--include-dashboard=false",
               "--disable-usage-stats", gpu="0")
    check(head.returncode == 0, f"ray start --head (GPU 0) {head.stderr[-400:]}")
    worker = ray("start", f"--address={ADDRESS}", "--num-gpus=1", "--disable-usage-stats", gpu="1")
    check(worker.returncode == 0, f"ray start --address (GPU 1) {worker.stderr[-400:]}")
    daemon = Daemon(ROOT, CONFIG, MGR_RAY_ADDRESS=ADDRESS)
    try:
        with section("the cluster as mgr reads it") as wanted:
            skip_unless(wanted)
            reading = asyncio.run(read_cluster(ADDRESS))
            say(f"     {reading.describe()}; GPU memory per node {[n.gpu_memory >> 30 for n in reading.nodes]} GiB")
            check(len(reading.gpu_nodes) == 2 and all(n.gpus == 1 for n in reading.gpu_nodes),
                  "two Ray nodes of one GPU each")
        daemon.start()
        made = daemon.mgr("create", "smol-ray", "--from", folder)
        check(made.returncode == 0, f"mgr create smol-ray {made.stderr[-300:]}")

        with section("a model over both GPUs through Ray") as wanted:
            skip_unless(wanted)
            started = time.monotonic()
            answer = daemon.chat("smol-ray")
            say(f"     cold start through Ray: {time.monotonic() - started:.1f}s")
            check("Paris" in answer, f"/api/chat answer: {answer!r}")
            answer = daemon.chat("smol-ray", api="openai")
            check("Paris" in answer, f"/v1/chat/completions answer: {answer!r}")
            argv = daemon.servers()[0].cmdline()
            check(flag(argv, "--distributed-executor-backend") == "ray", "--distributed-executor-backend ray")
            shape = (flag(argv, "--pipeline-parallel-size"), flag(argv, "--tensor-parallel-size"))
            check(shape == ("2", "1"), f"pipeline x tensor parallel {shape}")
            entry = daemon.entry("smol-ray") or {}
            say(f"     /api/ps ray: {entry.get('ray')}")
            check(len((entry.get("ray") or {}).get("nodes", [])) == 2, "/api/ps shows the Ray placement (2 nodes)")
            listing = daemon.mgr("ps").stdout
            say(listing.rstrip())
            check("Ray: 2 GPU on 2 nodes" in listing, "mgr ps shows the Ray placement")
            holders = gpu_holders()
            say(f"     GPU holders: {holders}; used MiB {[used_mib(i) for i in range(2)]}")
            check(all(used_mib(i) - baseline[i] > 300 for i in range(2)), "memory held on both GPUs")

        with section("a killed Ray worker is a crash; the next request reloads") as wanted:
            skip_unless(wanted)
            victims = gpu_holders().get(1, [])
            check(bool(victims), f"a Ray worker holds GPU 1: {victims}")
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            # the API server closes its port a few seconds before its process ends; the daemon counts the crash at
            # the end (a request in between is answered 502)
            gone = wait(lambda: daemon.entry("smol-ray") is None, 120)
            check(gone is not None, f"the daemon saw the runner exit ({gone}s after the kill)")
            started = time.monotonic()
            answer = daemon.chat("smol-ray")
            check("Paris" in answer, f"reloaded in {time.monotonic() - started:.1f}s and answered: {answer!r}")

        with section("unloading returns both GPUs' memory") as wanted:
            skip_unless(wanted)
            check(daemon.mgr("stop", "smol-ray").returncode == 0, "mgr stop smol-ray")
            back = wait(lambda: all(used_mib(i) - baseline[i] < 300 for i in range(2)), 120)
            check(back is not None, f"both GPUs back to baseline in {back}s ({[used_mib(i) for i in range(2)]} MiB)")
    finally:
        daemon.runner_logs(30)
        daemon.stop()
        stopped = ray("stop", "--force", gpu="")
        say(f"ray stop: {stopped.returncode}")
        back = wait(lambda: all(used_mib(i) - baseline[i] < 300 for i in range(2)), 60)
        check(back is not None, "nothing left on the GPUs after ray stop")
    say(f"{len(FAILED)} failed" if FAILED else "ALL PASS")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2-st")
