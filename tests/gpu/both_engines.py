"""GGUF on the GPU and one memory budget over both engines, on one GPU (issue 17). Run by gpu_checks.py after its
vLLM checks, or alone:

    python3 tests/gpu/both_engines.py /tmp/smollm2-st /tmp/stage/smollm2.gguf [/tmp/lcp-build/bin/llama-server]

Needs the CUDA llama-cpp-python (tests/gpu/device.sh builds it there) and, for the comparison, llama.cpp's own
server built from the same source. Sections (BOTH_ENGINES_SECTIONS=a,b,... reruns some):
- gguf: the GGUF model fully offloaded answers through both APIs; `mgr ps` shows GPU 0 and /api/ps's size_vram is
  what NVML measured for the runner;
- peer: tokens/s of the runner on the GPU against llama-server from the same llama.cpp at 1, 4, 8, 16 clients
  (same model, slots, context, 128 tokens each with ignore_eos), ≥ 0.95 asked;
- budget: a vLLM model and the GGUF model side by side on GPU 0, each in the memory the other leaves;
- lru: with max_loaded_models 1, the least recently used makes room (the GGUF one by stopping, the vLLM one by
  sleeping, which does not count);
- unload: memory back to the baseline after both unload;
- kill: SIGKILL of the daemon with both loaded leaves no process holding GPU memory;
- partial: another process (torch) holds all but half of what the GGUF model needs: mgr offloads part of the
  layers and the model answers, instead of waiting for memory nothing of ours can free.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pynvml
from harness import (
    FAILED,
    Daemon,
    check,
    gpu_holders,
    paired_throughput,
    process_mib,
    say,
    section,
    skip_unless,
    used_mib,
    wait,
)

from mgr.daemon.memory import GGUF_GPU_FIXED

ROOT = Path(os.environ.get("MGR_GPU_ROOT", "/tmp/mgr-gpu")) / "both"
SECTIONS = set(os.environ.get("BOTH_ENGINES_SECTIONS", "gguf,peer,budget,lru,unload,kill,partial").split(","))
SLOTS = 16
CONFIG = f"""
[models."smol-st:latest"]
vllm_args = ["--enforce-eager"]
[models."smol-gguf:latest"]
num_parallel = {SLOTS}
"""
LLAMA_MARKER = "mgr.daemon.runners.llama"


def llama_runner(daemon: Daemon) -> int | None:
    found = daemon.servers(LLAMA_MARKER)
    return found[0].pid if found else None


def gpu_layers(daemon: Daemon) -> int | None:
    for p in daemon.servers(LLAMA_MARKER):
        argv = p.cmdline()
        if "--gpu-layers" in argv:
            return int(argv[argv.index("--gpu-layers") + 1])
    return None


def fresh(name: str, **env: str) -> Daemon:
    daemon = Daemon(ROOT / name, CONFIG, 11434, **env)
    daemon.start()
    return daemon


def create_both(daemon: Daemon, folder: str, gguf: str) -> None:
    for model, source in (("smol-st", folder), ("smol-gguf", gguf)):
        made = daemon.mgr("create", model, "--from", source)
        check(made.returncode == 0, f"mgr create {model} --from {source} {made.stderr.strip()[-200:]}")


def compare_with_llama_server(daemon: Daemon, gguf: str, server: str) -> None:
    """Same GGUF, same slots and per-slot context, all layers on GPU 0: the model through mgr (its relay
    included) against llama-server on its own port."""
    port = 18080
    process = subprocess.Popen([server, "-m", gguf, "-ngl", "999", "-np", str(SLOTS), "-c", str(2048 * SLOTS),
                                "--port", str(port), "--host", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        check(wait(ready, 120) is not None, "llama-server is up")
        for clients in (1, 4, 8, 16):
            ours, theirs, ratio = paired_throughput(daemon.url, url, "smol-gguf", clients)
            check(ratio >= 0.95, f"{clients} clients: mgr {ours:,.0f} tokens/s, llama-server {theirs:,.0f} "
                  f"tokens/s (median of paired rounds {ratio:.2f})")
    finally:
        process.terminate()
        process.wait(timeout=30)


def hold_gpu(leave_free_mib: int) -> subprocess.Popen[bytes]:
    """Another user's process: takes all of GPU 0 but `leave_free_mib`."""
    free = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free) >> 20
    take = max(0, free - leave_free_mib - 600)  # its own CUDA context takes ~600 MiB more
    script = (f"import torch, signal, sys; x = torch.empty({take} << 20, dtype=torch.uint8, device='cuda'); "
              "print('held', flush=True); signal.pause()")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert holder.stdout is not None
    holder.stdout.readline()
    return holder


def main(folder: str, gguf: str, server: str | None) -> None:
    pynvml.nvmlInit()
    baseline = used_mib(0)
    say(f"GPU 0: {baseline} MiB used before mgr")
    need = 0
    daemon = fresh("main")
    try:
        create_both(daemon, folder, gguf)
        with section("a GGUF model fully offloaded to GPU 0", "gguf" in SECTIONS) as wanted:
            skip_unless(wanted)
            started = time.monotonic()
            answer = daemon.chat("smol-gguf")
            say(f"     cold start {time.monotonic() - started:.1f}s")
            check("Paris" in answer, f"/api/chat: {answer!r}")
            check("Paris" in daemon.chat("smol-gguf", api="openai"), "/v1/chat/completions answers too")
            listing = daemon.mgr("ps").stdout
            say(listing.rstrip())
            entry = daemon.entry("smol-gguf") or {}
            check(entry.get("gpus") == [0] and "GPU 0" in listing, "mgr ps shows it on GPU 0")
            check(gpu_layers(daemon) == -1, f"all layers on the GPU (--gpu-layers {gpu_layers(daemon)})")
            pid = llama_runner(daemon)
            measured = process_mib(daemon.tree(next(p for p in daemon.servers(LLAMA_MARKER))))
            vram = entry.get("size_vram", 0) >> 20
            check(pid is not None and abs(measured.get(0, 0) - vram) <= max(64, vram // 10),
                  f"/api/ps size_vram {vram} MiB is what NVML measured ({measured.get(0, 0)} MiB)")
            need = entry.get("size", 0) >> 20
        with section("tokens/s against llama.cpp's own server",
                     "peer" in SECTIONS and server is not None) as wanted:
            skip_unless(wanted)
            compare_with_llama_server(daemon, gguf, server or "")
        with section("both engines side by side on one GPU", "budget" in SECTIONS) as wanted:
            skip_unless(wanted)
            check("Paris" in daemon.chat("smol-gguf"), "smol-gguf loaded")
            check("Paris" in daemon.chat("smol-st"), "smol-st (vLLM) loaded beside it")
            models = {m["name"].split(":")[0]: m for m in daemon.ps()}
            check(models.keys() >= {"smol-gguf", "smol-st"} and all(m["gpus"] == [0] for m in models.values()),
                  f"both on GPU 0: {[(n, m['gpus'], m['state']) for n, m in models.items()]}")
            vllm = daemon.servers()[0].cmdline()
            fraction = float(vllm[vllm.index("--gpu-memory-utilization") + 1])
            total = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total) >> 20
            gguf_mib = process_mib(daemon.tree(daemon.servers(LLAMA_MARKER)[0])).get(0, 0)
            check(fraction * total + gguf_mib < total, f"vLLM's share {fraction:.3f} x {total} MiB + the GGUF "
                  f"runner's {gguf_mib} MiB fit the GPU")
        with section("memory back to the baseline after both unload", "unload" in SECTIONS) as wanted:
            skip_unless(wanted)
            for name in ("smol-gguf", "smol-st"):
                daemon.mgr("stop", name)
            back = wait(lambda: used_mib(0) - baseline < 300, 90)
            check(back is not None, f"GPU 0 at {used_mib(0)} MiB (baseline {baseline}) {back or 0:.1f}s after")
    finally:
        daemon.stop()
        daemon.runner_logs(8)

    with section("the least recently used makes room (max_loaded_models 1)", "lru" in SECTIONS) as wanted:
        skip_unless(wanted)
        daemon = fresh("lru", MGR_MAX_LOADED_MODELS="1")
        try:
            create_both(daemon, folder, gguf)
            check("Paris" in daemon.chat("smol-gguf"), "smol-gguf loaded first")
            check("Paris" in daemon.chat("smol-st"), "smol-st loaded second")
            names = {m["name"].split(":")[0]: m["state"] for m in daemon.ps()}
            check("smol-gguf" not in names, f"the GGUF model (least recently used) made room by leaving: {names}")
            check("Paris" in daemon.chat("smol-gguf"), "smol-gguf again")
            states = {m["name"].split(":")[0]: m["state"] for m in daemon.ps()}
            check(states.get("smol-st") == "sleeping" and states.get("smol-gguf") == "ready",
                  f"the vLLM model made room by sleeping: {states}")
        finally:
            daemon.stop()

    with section("SIGKILL of the daemon with both engines loaded", "kill" in SECTIONS) as wanted:
        skip_unless(wanted)
        daemon = fresh("kill")
        create_both(daemon, folder, gguf)
        check("Paris" in daemon.chat("smol-gguf") and "Paris" in daemon.chat("smol-st"), "both loaded")
        assert daemon.process is not None
        ours = {p.pid for p in daemon.descendants()}
        daemon.process.send_signal(signal.SIGKILL)
        gone = wait(lambda: not (set(gpu_holders()[0]) & ours), 30)
        check(gone is not None, f"no process of the daemon's holds GPU memory {gone or 0:.1f}s after the kill")

    with section("partial offload when another process holds the memory",
                 "partial" in SECTIONS and need > 0) as wanted:
        skip_unless(wanted)
        # room for the runner's context and compute buffer and half its layers (with only half of all it needs,
        # 789 MiB on the H200, the fixed part takes it all and the model rightly runs on the CPU)
        fixed = GGUF_GPU_FIXED >> 20
        holder = hold_gpu(fixed + (need - fixed) // 2)
        daemon = fresh("partial")
        try:
            create_both(daemon, folder, gguf)
            say(f"     {int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free) >> 20} MiB "
                f"free for a model that needs {need} MiB")
            answer = daemon.chat("smol-gguf")
            check("Paris" in answer, f"smol-gguf answers: {answer!r}")
            layers = gpu_layers(daemon)
            entry = daemon.entry("smol-gguf") or {}
            check(layers is not None and layers > 0 and entry.get("size_vram", 0) < entry.get("size", 0),
                  f"part of the layers on GPU 0: --gpu-layers {layers}, size_vram {entry.get('size_vram', 0) >> 20}"
                  f" of {entry.get('size', 0) >> 20} MiB; mgr ps: {daemon.mgr('ps').stdout.splitlines()[-1:]}")
        finally:
            daemon.stop()
            holder.terminate()
            holder.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    say(f"{len(FAILED)} failed" if FAILED else "all passed")
    sys.exit(1 if FAILED else 0)
