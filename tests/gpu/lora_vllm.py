"""A Modelfile's ADAPTER (a PEFT LoRA folder) and TEMPLATE on the real vLLM, on a real GPU. Runs on the GPU machine
(../shared/gpu/README.md brings vLLM 0.25 and SmolLM2-135M-Instruct as a safetensors folder there), not in CI:

    source tests/gpu/env.sh && python3 tests/gpu/lora_vllm.py /tmp/smollm2-st

Writes two tiny real PEFT adapters for SmolLM2 (q_proj and v_proj of every layer, rank 8): one whose B matrices are
zero, one with random weights. Checks, printing what it measured: `mgr create -f Modelfile` with FROM the
safetensors model and ADAPTER the random adapter's folder; the vLLM runner starts with --enable-lora and the
adapter under the model's name; greedy answers: the random adapter changes the base's answer, the zero one (made
through /api/create with uploaded blobs) does not; a TEMPLATE that renders the last message alone gives the
prompt a raw completion of that text has. Exits 1 at the first failure.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from gpu_checks import ROOT, URL, _up, check, env, mgr, runners, say, wait
from safetensors.torch import save_file

LAYERS, WIDTH, KV_WIDTH, RANK = 30, 576, 192, 8
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 16}


def peft_adapter(folder: Path, scale: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, '
        '"bias": "none", "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": false, '
        '"base_model_name_or_path": "smollm2"}')
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(LAYERS):
        for module, out in (("q_proj", WIDTH), ("v_proj", KV_WIDTH)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * scale
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def upload(path: Path) -> str:
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    response = httpx.post(f"{URL}/api/blobs/{digest}", content=path.read_bytes(), timeout=60)
    check(response.status_code in (200, 201), f"uploaded {path.name} ({response.status_code})")
    return digest


def chat(model: str) -> dict[str, Any]:
    response = httpx.post(URL + "/api/chat", timeout=600, json={
        "model": model, "stream": False, "options": GREEDY, "messages": QUESTION})
    check(response.status_code == 200, f"/api/chat {model} answered 200 ({response.status_code} {response.text[:300]})")
    return response.json()


def main(folder: str) -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    eager = 'vllm_args = ["--enforce-eager"]\n'  # functional checks: eager mode starts vLLM faster
    (ROOT / "config.toml").write_text("".join(f'[models."{name}:latest"]\n{eager}'
                                              for name in ("smol-st", "smol-st-lora", "smol-st-zero", "smol-st-bare")))
    log = (ROOT / "daemon.log").open("ab")
    daemon = subprocess.Popen([sys.executable, "-m", "mgr.cli", "serve"], env=env(), stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait(_up, 60, "the daemon answers")
        created = mgr("create", "smol-st", "--from", folder)
        check(created.returncode == 0, f"mgr create smol-st ({created.stderr.strip()[-300:]})")
        strong = peft_adapter(ROOT / "peft-strong", scale=0.5)
        zero = peft_adapter(ROOT / "peft-zero", scale=0.0)
        (ROOT / "Modelfile").write_text(f"FROM smol-st\nADAPTER {strong}\n")
        made = mgr("create", "smol-st-lora", "-f", str(ROOT / "Modelfile"))
        check(made.returncode == 0, f"mgr create -f Modelfile with a PEFT ADAPTER ({made.stderr.strip()[-300:]})")
        response = httpx.post(URL + "/api/create", timeout=60, json={
            "model": "smol-st-zero", "from": "smol-st", "stream": False,
            "adapters": {p.name: upload(p) for p in sorted(zero.iterdir())}})
        check(response.status_code == 200, f"/api/create with uploaded PEFT blobs ({response.text[:300]})")
        response = httpx.post(URL + "/api/create", timeout=60, json={
            "model": "smol-st-bare", "from": "smol-st", "stream": False, "template": "{{ messages[-1]['content'] }}"})
        check(response.status_code == 200, f"/api/create with a TEMPLATE ({response.text[:300]})")

        started = time.monotonic()
        base = chat("smol-st")
        say(f"base answered in {time.monotonic() - started:.0f}s: {base['message']['content']!r}")
        started = time.monotonic()
        adapted = chat("smol-st-lora")
        say(f"with the adapter in {time.monotonic() - started:.0f}s: {adapted['message']['content']!r}")
        argv = next(" ".join(p.cmdline()) for p in runners(daemon) if "smol-st-lora" in " ".join(p.cmdline()))
        check("--enable-lora" in argv and "--lora-modules smol-st-lora:latest=" in argv,
              f"the vLLM runner serves the adapter under the model's name ({argv[-300:]})")
        check(adapted["message"]["content"] != base["message"]["content"], "the adapter changed the greedy answer")
        zeroed = chat("smol-st-zero")
        check(zeroed["message"]["content"] == base["message"]["content"],
              f"the zero adapter changed nothing ({zeroed['message']['content']!r})")
        text = "The capital of France is"
        bare = httpx.post(URL + "/api/chat", timeout=600, json={
            "model": "smol-st-bare", "stream": False, "options": GREEDY,
            "messages": [{"role": "user", "content": text}]}).json()
        raw = httpx.post(URL + "/api/generate", timeout=600, json={
            "model": "smol-st", "stream": False, "options": GREEDY, "prompt": text, "raw": True}).json()
        say(f"TEMPLATE: {bare.get('prompt_eval_count')} prompt tokens, raw: {raw.get('prompt_eval_count')}; "
            f"{bare.get('message', {}).get('content')!r} / {raw.get('response')!r}")
        check(bare["prompt_eval_count"] == raw["prompt_eval_count"], "the TEMPLATE's prompt is the raw text's")
        say("ALL PASSED")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    main(sys.argv[1])
