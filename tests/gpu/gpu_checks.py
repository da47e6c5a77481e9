"""mgr with the real vLLM on a real GPU. Runs on the GPU machine (../shared/gpu/README.md brings vLLM 0.25 and
SmolLM2-135M-Instruct as a safetensors folder there), not in CI:

    export PYTHONPATH=<mgr shim>:/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
    python3 tests/gpu/gpu_checks.py /tmp/smollm2-st [/tmp/stage/smollm2.gguf [/tmp/lcp-build/bin/llama-server]]

Checks, in order, printing what it measured: `mgr create` of the safetensors folder; chat through /api/chat and
/v1/chat/completions (answers contain "Paris"); `mgr ps` shows it on GPU 0 with the vllm backend; a second
model shares the GPU with shares that sum below 1; keep-alive expiry puts a model to sleep (its GPU memory
goes back) and the next request wakes it; unloading returns the GPU memory. Exits 1 at the first failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pynvml

QUESTION = "What is the capital of France? Answer with one short sentence."
ROOT = Path(os.environ.get("MGR_GPU_ROOT", "/tmp/mgr-gpu"))
PORT = 11434
URL = f"http://127.0.0.1:{PORT}"


def say(message: str) -> None:
    print(message, flush=True)


def check(condition: bool, message: str) -> None:
    say(("PASS " if condition else "FAIL ") + message)
    if not condition:
        raise SystemExit(1)


def gpu_used_mib() -> int:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used // (1 << 20)


def env() -> dict[str, str]:
    return dict(os.environ, MGR_HOST=f"127.0.0.1:{PORT}", MGR_MODELS=str(ROOT / "models"),
                MGR_STATE_DIR=str(ROOT / "state"), MGR_CONFIG=str(ROOT / "config.toml"), MGR_CONTEXT_LENGTH="2048")


def mgr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=env(), capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)


def runners(daemon: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The vLLM API servers under the daemon (not the guards that lead their process groups)."""
    found = []
    for p in psutil.Process(daemon.pid).children(recursive=True):
        try:
            argv = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "vllm.entrypoints.openai.api_server" in argv and "runners.guard" not in argv:
            found.append(p)
    return found


def share(process: psutil.Process) -> float:
    argv = process.cmdline()
    return float(argv[argv.index("--gpu-memory-utilization") + 1])


def ps() -> list[dict[str, Any]]:
    return httpx.get(URL + "/api/ps").json()["models"]


def chat(model: str, **extra: Any) -> dict[str, Any]:
    response = httpx.post(URL + "/api/chat", timeout=600, json={
        "model": model, "stream": False, "options": {"temperature": 0, "num_predict": 40},
        "messages": [{"role": "user", "content": QUESTION}], **extra})
    check(response.status_code == 200, f"/api/chat {model} answered 200 ({response.status_code} {response.text[:300]})")
    return response.json()


def wait(condition: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            check(False, f"{what} within {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - start


def main(folder: str) -> None:
    pynvml.nvmlInit()
    ROOT.mkdir(parents=True, exist_ok=True)
    # --enforce-eager: these are functional checks, and eager mode starts vLLM faster (the benchmark does not use it)
    (ROOT / "config.toml").write_text('[models."smol-st:latest"]\nvllm_args = ["--enforce-eager"]\n'
                                      '[models."smol-st-b:latest"]\nvllm_args = ["--enforce-eager"]\n')
    baseline = gpu_used_mib()
    say(f"GPU 0: {pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))}, {baseline} MiB used before mgr")
    log = (ROOT / "daemon.log").open("ab")
    daemon = subprocess.Popen([sys.executable, "-m", "mgr.cli", "serve"], env=env(), stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait(lambda: _up(), 60, "the daemon answers")
        created = mgr("create", "smol-st", "--from", folder)
        check(created.returncode == 0, f"mgr create smol-st --from {folder} ({created.stderr.strip()[-300:]})")
        check(mgr("cp", "smol-st", "smol-st-b").returncode == 0, "mgr cp smol-st smol-st-b")
        shown = httpx.post(URL + "/api/show", json={"model": "smol-st"}).json()
        check(shown["details"]["format"] == "safetensors", f"format safetensors ({shown['details']})")

        started = time.monotonic()
        answer = chat("smol-st")
        say(f"     cold start through mgr: {time.monotonic() - started:.1f}s "
            f"(load_duration {answer['load_duration'] / 1e9:.1f}s)")
        check("Paris" in answer["message"]["content"], f"/api/chat answer: {answer['message']['content']!r}")
        check(answer["eval_count"] > 0 and answer["prompt_eval_count"] > 0, "ns metrics from vLLM's usage")
        completion = httpx.post(URL + "/v1/chat/completions", timeout=120, json={
            "model": "smol-st", "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": QUESTION}]}).json()
        text = completion["choices"][0]["message"]["content"]
        check("Paris" in text, f"/v1/chat/completions answer: {text!r}")
        listing = mgr("ps").stdout
        say(listing.rstrip())
        check("GPU 0" in listing and "vllm" in listing, "mgr ps shows smol-st on GPU 0 with the vllm backend")
        one = runners(daemon)
        check(len(one) == 1, "one vLLM runner")
        argv = one[0].cmdline()
        port = argv[argv.index("--port") + 1]
        bypass = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "model": "smol-st:latest", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        check(bypass.status_code == 401, f"the vLLM port refuses a request without the runner's secret "
              f"(VLLM_API_KEY): {bypass.status_code}")
        used_one = gpu_used_mib() - baseline
        say(f"     GPU memory with one model: {used_one} MiB (share {share(one[0]):.3f}); ps size_vram "
            f"{ps()[0]['size_vram'] // (1 << 20)} MiB")

        answer_b = chat("smol-st-b")
        check("Paris" in answer_b["message"]["content"], "the second model answers too")
        both = runners(daemon)
        shares = [share(p) for p in both]
        on_gpu0 = [m for m in ps() if m["gpus"] == [0]]
        check(len(both) == 2 and len(on_gpu0) == 2, f"two models share GPU 0 ({[m['name'] for m in on_gpu0]})")
        check(sum(shares) < 0.95, f"their vLLM shares sum below 1: {shares} -> {sum(shares):.3f}")
        total_mib = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total // (1 << 20)
        # each vLLM process holds its share plus its CUDA context (~0.6 GiB), which vLLM does not count in it
        used_two = gpu_used_mib() - baseline
        check(used_two < sum(shares) * total_mib + 1024 * len(both),
              f"GPU memory within the granted shares plus a CUDA context each ({used_two} MiB)")

        # the warm tier: keep_alive expiry puts smol-st to sleep, a request wakes the same process
        pid = [p.pid for p in both if "smol-st:latest" in " ".join(p.cmdline())][0]
        chat("smol-st", keep_alive="2s")
        before_sleep = gpu_used_mib()
        slept = wait(lambda: any(m["name"] == "smol-st:latest" and m["state"] == "sleeping" for m in ps()), 60,
                     "smol-st falls asleep after its keep_alive")
        # the state turns "sleeping" when the sleep starts; vLLM then needs a moment to move the weights out
        settled = wait(lambda: before_sleep - gpu_used_mib() > 500 or pid not in [p.pid for p in runners(daemon)],
                       30, "the sleep completes")
        check(pid in [p.pid for p in runners(daemon)], "the runner is still there, asleep")
        freed = before_sleep - gpu_used_mib()
        say(f"     sleep completed {settled:.2f}s after ps showed it")
        say(f"     asleep {slept:.1f}s after the request; GPU memory freed by sleeping: {freed} MiB")
        check(freed > 500, "sleeping gave GPU memory back")
        started = time.monotonic()
        first_token = None
        with httpx.stream("POST", URL + "/api/chat", timeout=120, json={
                "model": "smol-st", "options": {"temperature": 0, "num_predict": 40},
                "messages": [{"role": "user", "content": QUESTION}]}) as response:
            text = ""
            for line in response.iter_lines():
                if not line:
                    continue
                chunk = json.loads(line)
                if first_token is None and chunk.get("message", {}).get("content"):
                    first_token = time.monotonic() - started
                text += chunk.get("message", {}).get("content", "")
                final = chunk
        say(f"     wake: load_duration {final['load_duration'] / 1e9:.3f}s, first token {first_token:.3f}s after "
            f"the request")
        check("Paris" in text and first_token is not None and first_token < 2.0, "woken; first token within 2 s")
        check(pid in [p.pid for p in runners(daemon)], "woken in the same process (no cold start)")

        for name in ("smol-st", "smol-st-b"):
            check(mgr("stop", name).returncode == 0, f"mgr stop {name}")
        wait(lambda: not runners(daemon), 60, "runner processes gone")
        returned = wait(lambda: gpu_used_mib() - baseline < 300, 60, "GPU memory back to the baseline")
        say(f"     GPU memory after unloading: {gpu_used_mib()} MiB (baseline {baseline}), {returned:.1f}s after")
        check(ps() == [], "ps is empty")
    finally:
        for log_file in (ROOT / "state" / "runners").glob("*.log"):
            say(f"----- {log_file.name} (last lines)")
            say("\n".join(log_file.read_text(errors="replace").splitlines()[-25:]))
        daemon.terminate()
        daemon.wait(timeout=60)
        say(f"daemon stopped; runners left: {len(runners(daemon)) if daemon.poll() is None else 0}; "
            f"GPU memory {gpu_used_mib()} MiB")


def _up() -> bool:
    try:
        return httpx.get(URL + "/", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    # then both engines on the GPU (both_engines.py): GGUF offloaded, against llama-server, one memory budget
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2-st"
    if os.environ.get("GPU_CHECKS_VLLM", "1") == "1":
        main(folder)
    if len(sys.argv) > 2:
        import both_engines
        from harness import FAILED

        both_engines.main(folder, sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
        say(f"{len(FAILED)} failed" if FAILED else "all passed")
        sys.exit(1 if FAILED else 0)
