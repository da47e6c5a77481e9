"""`mgr doctor`: what this installation can run, and whether the daemon answers. The engines are inspected by
`python -m mgr.daemon.backends` in a child process (the daemon's own view, and the CLI never imports them)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .client import APIError, Client, DaemonUnreachable
from .format import human_size


def report() -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "mgr.daemon.backends"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"could not inspect the engines: {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def lines(found: dict[str, Any], daemon: str) -> list[str]:
    llama, vllm, store = found["llama.cpp"], found["vllm"], found["store"]
    out = [f"daemon      {daemon}"]
    if llama["installed"]:
        out.append(f"llama.cpp   llama-cpp-python {llama['version']}, backends: {', '.join(llama['backends'])}")
    else:
        out.append(f"llama.cpp   not installed: {llama['hint']}")
    if vllm["installed"]:
        out.append(f"vLLM        {vllm['version']} ({vllm['python']})")
    else:
        out.append(f"vLLM        not installed: {vllm['hint']}")
    if found["gpus"]:
        for gpu in found["gpus"]:
            out.append(f"GPU {gpu['index']}       {gpu['name']}, {human_size(gpu['free'])} free of "
                       f"{human_size(gpu['total'])}")
    else:
        out.append("GPUs        none that NVML sees: GGUF models run on the CPU; safetensors (vLLM) cannot run")
    if "CUDA" not in llama.get("backends", []) and found["gpus"]:
        out.append("hint        GPUs but a CPU-only llama.cpp: run scripts/install.sh where nvcc is on PATH")
    out.append(f"store       {store['path']}: {store['models']} models, {store['blobs']} blobs, "
               f"{human_size(store['bytes'])}; {human_size(store['free'])} free on its disk")
    return out


def doctor(client: Client) -> int:
    try:
        answer = client.request_json("GET", "/api/version")
        daemon = f"answers at {client.base_url} (mgr {answer.get('mgr_version', '?')})"
    except (DaemonUnreachable, APIError) as e:
        daemon = f"not answering at {client.base_url} ({e})"
    for line in lines(report(), daemon):
        print(line)
    return 0
