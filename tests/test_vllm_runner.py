"""The vLLM runner without a GPU: its exact command lines for given placements and versions, and its whole
lifecycle through the real daemon (HTTP over loopback, imaginary GPU) against a STAND-IN vLLM server
(tests/standin/fake_vllm: a `vllm` package whose OpenAI server accepts vLLM's command line and serves the
stand-in runner, sleep endpoints included). The real vLLM is verified on the GPU machine (tests/gpu/)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from conftest import wait_for
from fakehub import import_file
from standin.gpus import StaticGpus
from standin.models import write_tiny_safetensors_model

from mgr.daemon.app import create_app
from mgr.daemon.errors import EngineUnavailable
from mgr.daemon.placement import Placement
from mgr.daemon.runners.base import LoadSpec
from mgr.daemon.runners.vllm import vllm_argv, vllm_version
from mgr.registry.config import ModelOverrides, Settings

FAKE_VLLM = Path(__file__).parent / "standin" / "fake_vllm"
GIB = 1 << 30
SPEC = LoadSpec(name="smol:latest", digest="d" * 64, format="safetensors", model_path=Path("/m/links/abc"),
                num_ctx=2048, num_parallel=256, size=270_000_000)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_command_line_for_one_gpu() -> None:
    argv = vllm_argv(SPEC, Placement((0,), memory_fraction=0.075), 40001, "/py", (0, 25, 0))
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "/m/links/abc" and flag(argv, "--served-model-name") == "smol:latest"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "40001"
    assert flag(argv, "--gpu-memory-utilization") == "0.075"
    assert flag(argv, "--max-model-len") == "2048" and flag(argv, "--max-num-seqs") == "256"
    assert flag(argv, "--tensor-parallel-size") == "1" and "--enable-sleep-mode" in argv
    assert "--disable-log-requests" not in argv and "--distributed-executor-backend" not in argv


def test_command_line_for_tensor_parallel_ray_old_versions_and_extra_args() -> None:
    tp = vllm_argv(SPEC, Placement((2, 3, 4, 5), memory_fraction=0.5), 1, "/py", (0, 25, 0))
    assert flag(tp, "--tensor-parallel-size") == "4"
    ray = vllm_argv(SPEC, Placement(tuple(range(16)), 0.9, pipeline_parallel=2), 1, "/py", (0, 25, 0),
                    ray_address="ray://head:10001")
    assert flag(ray, "--distributed-executor-backend") == "ray"
    assert flag(ray, "--pipeline-parallel-size") == "2" and flag(ray, "--tensor-parallel-size") == "8"
    old = vllm_argv(SPEC, Placement((0,), 0.3), 1, "/py", (0, 9, 2), extra_args=("--enforce-eager",))
    assert "--disable-log-requests" in old and old[-1] == "--enforce-eager"


def test_missing_vllm_names_the_install_command() -> None:
    vllm_version.cache_clear()
    with pytest.raises(EngineUnavailable, match=r"pip install 'mgr\[vllm\]'"):
        vllm_version(sys.executable)  # this environment has no vLLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real daemon app, in this process on a loopback port, with one imaginary 80 GiB GPU, whose vLLM
    runners come from the stand-in vllm package."""
    root = tmp_path_factory.mktemp("vllm")
    model = write_tiny_safetensors_model(root / "smol-st")
    os.environ["PYTHONPATH"] = f"{FAKE_VLLM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    vllm_version.cache_clear()
    port = _free_port()
    settings = Settings(host=f"127.0.0.1:{port}", models_dir=root / "models", state_dir=root / "state",
                        num_ctx=2048, models={"smol:latest": ModelOverrides(vllm_args=("--enforce-eager",))})
    server = uvicorn.Server(uvicorn.Config(create_app(settings, gpus=StaticGpus([80 * GIB])), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: server.started, timeout=20)
    from mgr.registry.store import Store

    store = Store(root / "models")  # the same store folder the daemon serves
    files = {name: import_file(store, model / name) for name in ("config.json", "model.safetensors")}
    store.create("smol", files, {"type": "test"})
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].removeprefix(f"{FAKE_VLLM}{os.pathsep}")


def runner_process(url: str) -> psutil.Process:
    children = [p for p in psutil.Process().children(recursive=True) if "vllm.entrypoints" in " ".join(p.cmdline())]
    assert len(children) == 1, children
    return children[0]


def test_the_daemon_starts_vllm_with_its_placement_and_proxies_streams(daemon_url: str) -> None:
    with httpx.stream("POST", daemon_url + "/api/chat", timeout=60, json={
            "model": "smol", "messages": [{"role": "user", "content": "Capital of France?"}]}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line["message"]["content"] for line in lines) == "The capital of France is Paris."
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["load_duration"] > 0
    process = runner_process(daemon_url)
    argv = process.cmdline()
    assert flag(argv, "--tensor-parallel-size") == "1" and flag(argv, "--max-model-len") == "2048"
    assert 0.05 < float(flag(argv, "--gpu-memory-utilization")) < 0.2  # a share of the 80 GiB GPU
    assert argv[-1] == "--enforce-eager"  # the model's extra vLLM arguments from the config
    environ = process.environ()
    assert environ["CUDA_VISIBLE_DEVICES"] == "0" and environ["VLLM_SERVER_DEV_MODE"] == "1"
    sse = httpx.post(daemon_url + "/v1/chat/completions", timeout=60, json={
        "model": "smol", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).text
    assert "Paris" in sse and sse.rstrip().endswith("data: [DONE]")
    ps = httpx.get(daemon_url + "/api/ps").json()["models"]
    assert ps[0]["backend"] == "vllm" and ps[0]["gpus"] == [0] and ps[0]["state"] == "ready"


def test_sleep_and_wake_through_the_daemon(daemon_url: str) -> None:
    pid = runner_process(daemon_url).pid
    httpx.post(daemon_url + "/api/generate", timeout=60, json={"model": "smol", "prompt": "hi", "keep_alive": "300ms",
                                                                 "stream": False})
    assert wait_for(lambda: httpx.get(daemon_url + "/api/ps").json()["models"][0]["state"] == "sleeping", timeout=10)
    port = flag(runner_process(daemon_url).cmdline(), "--port")
    assert httpx.get(f"http://127.0.0.1:{port}/is_sleeping").json() == {"is_sleeping": True}
    started = time.monotonic()
    answer = httpx.post(daemon_url + "/api/generate", timeout=60,
                        json={"model": "smol", "prompt": "hi", "stream": False})
    assert answer.status_code == 200 and "Paris" in answer.json()["response"]
    assert time.monotonic() - started < 2.0 and runner_process(daemon_url).pid == pid  # woken, not restarted
    assert httpx.get(f"http://127.0.0.1:{port}/is_sleeping").json() == {"is_sleeping": False}


def test_a_crashed_vllm_runner_is_replaced(daemon_url: str) -> None:
    old = runner_process(daemon_url)
    os.kill(old.pid, signal.SIGKILL)
    assert wait_for(lambda: httpx.get(daemon_url + "/api/ps").json()["models"] == [], timeout=10)
    answer = httpx.post(daemon_url + "/api/generate", timeout=60,
                        json={"model": "smol", "prompt": "hi", "stream": False})
    assert answer.status_code == 200 and runner_process(daemon_url).pid != old.pid


def test_unload_stops_vllm_with_sigterm(daemon_url: str) -> None:
    process = runner_process(daemon_url)
    started = time.monotonic()
    unloaded = httpx.post(daemon_url + "/api/generate", json={"model": "smol", "keep_alive": 0}, timeout=60)
    assert unloaded.json()["done_reason"] == "unload"
    process.wait(timeout=5)  # (the daemon reaps it, so psutil sees no exit code)
    # SIGKILL would come only after a 10 s grace: gone this fast, SIGTERM stopped it
    assert not process.is_running() and time.monotonic() - started < 5
    assert httpx.get(daemon_url + "/api/ps").json()["models"] == []
