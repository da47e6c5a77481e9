"""mgr and a Ray cluster, without a GPU: the REAL Ray (a head node started here, declaring two logical GPUs, as
Ray lets a machine without GPUs do) read by the daemon's probe; the daemon placing a vLLM model on it over
the STAND-IN vLLM server (tests/standin/fake_vllm, which takes vLLM's command line) with imaginary local GPUs;
a cluster that is down or too small. The real vLLM over two real GPUs through Ray: tests/gpu/ray_check.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import free_port, wait_for
from fakehub import import_file
from standin.gpus import StaticGpus
from standin.models import write_tiny_safetensors_model
from test_vllm_runner import FAKE_VLLM, flag, runner_process

from mgr.daemon.app import create_app
from mgr.daemon.placement import RayCluster, TooBig, place
from mgr.daemon.ray_cluster import RayReading, RayUnavailable, parse_reading, read_cluster
from mgr.daemon.runners.vllm import vllm_version
from mgr.registry.config import ModelOverrides, Settings
from mgr.registry.store import Store

GIB = 1 << 30
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ray head node (no dashboard), two logical GPUs; stopped with its whole process group."""
    if not RAY.exists():
        pytest.fail("Ray is missing from the test environment: bash scripts/install.sh gguf,test installs it")
    port = free_port()
    # Ray's session folder path must stay short (AF_UNIX socket paths): not under pytest's tmp
    temp = Path("/tmp") / f"mgr-ray-{port}"
    process = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                                "--num-gpus=2", "--include-dashboard=false", "--disable-usage-stats",
                                f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _answers(address), timeout=60), "the Ray head did not start"
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)  # raylet and workers of this head only
        shutil.rmtree(temp, ignore_errors=True)


def _answers(address: str) -> bool:
    try:
        return bool(asyncio.run(read_cluster(address, timeout=20)).nodes)
    except RayUnavailable:
        return False


def test_the_probe_reads_the_real_clusters_nodes_and_gpus(ray_head: str) -> None:
    reading = asyncio.run(read_cluster(ray_head))
    assert len(reading.nodes) == 1 and reading.nodes[0].gpus == 2 and reading.free_gpus == 2
    assert reading.cluster(Settings()) == RayCluster(1, 2, gpu_memory=None)  # no NVML here: memory unknown
    # the settings stay as overrides
    assert reading.cluster(Settings(ray_nodes=3, ray_gpus_per_node=8)) == RayCluster(3, 8, gpu_memory=None)
    assert "2 GPU free" in reading.describe()


def test_a_cluster_that_is_down_is_a_clear_error_at_once() -> None:
    with pytest.raises(RayUnavailable, match="not reachable"):
        asyncio.run(read_cluster(f"127.0.0.1:{free_port()}", timeout=30))
    with pytest.raises(RayUnavailable, match="unexpected probe output"):
        parse_reading("head:6379", "Traceback ...")


def test_placement_on_the_cluster_by_setting_and_by_size() -> None:
    cluster = RayCluster(nodes=2, gpus_per_node=1, gpu_memory=80 * GIB)
    local = [StaticGpus([80 * GIB]).gpus()[0]]
    forced = place("safetensors", 1 * GIB, local, cluster=cluster, ray_gpus=2)
    assert forced is not None and forced.ray and forced.pipeline_parallel == 2 and forced.tensor_size == 1
    assert forced.memory_fraction == pytest.approx(0.5 / 80)
    assert place("safetensors", 1 * GIB, local, cluster=cluster) == place("safetensors", 1 * GIB, local)  # fits here
    with pytest.raises(TooBig, match="4 GPUs of the Ray cluster, which has 2 machines x 1 GPUs"):
        place("safetensors", 1 * GIB, local, cluster=cluster, ray_gpus=4)
    assert not place("gguf", 1 * GIB, local, cluster=cluster, ray_gpus=2).ray  # type: ignore[union-attr]


@pytest.fixture()
def daemon_on(ray_head: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The real daemon in this process, one imaginary 80 GiB GPU, the stand-in vLLM; the model "smol" set to run
    on 2 GPUs of the Ray cluster at `request.param` ("head" = the real one, else an address where none runs)."""
    address = ray_head if request.param == "head" else f"127.0.0.1:{free_port()}"
    model = write_tiny_safetensors_model(tmp_path / "smol-st")
    os.environ["PYTHONPATH"] = f"{FAKE_VLLM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    vllm_version.cache_clear()
    port = free_port()
    settings = Settings(host=f"127.0.0.1:{port}", models_dir=tmp_path / "models", state_dir=tmp_path / "state",
                        num_ctx=2048, ray_address=address, models={"smol:latest": ModelOverrides(ray_gpus=2)})
    server = uvicorn.Server(uvicorn.Config(create_app(settings, gpus=StaticGpus([80 * GIB])), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=20)
    store = Store(tmp_path / "models")
    store.create("smol", {name: import_file(store, model / name) for name in ("config.json", "model.safetensors")},
                 {"type": "test"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].removeprefix(f"{FAKE_VLLM}{os.pathsep}")


def _chat(url: str) -> httpx.Response:
    return httpx.post(url + "/api/chat", timeout=120, json={
        "model": "smol", "stream": False, "messages": [{"role": "user", "content": "Capital of France?"}]})


@pytest.mark.parametrize("daemon_on", ["head"], indirect=True)
def test_the_daemon_places_a_model_on_the_cluster_it_read(daemon_on: str) -> None:
    answer = _chat(daemon_on)
    assert answer.status_code == 200 and "Paris" in answer.json()["message"]["content"]
    process = runner_process(daemon_on)
    argv = process.cmdline()
    assert flag(argv, "--distributed-executor-backend") == "ray"
    assert flag(argv, "--tensor-parallel-size") == "2" and flag(argv, "--pipeline-parallel-size") == "1"
    environ = process.environ()
    assert "CUDA_VISIBLE_DEVICES" not in environ  # Ray hands each worker its GPU
    assert environ["RAY_ADDRESS"].endswith(daemon_on and environ["RAY_ADDRESS"].rpartition(":")[2])
    assert environ["NCCL_NVLS_ENABLE"] == "0"
    entry = httpx.get(daemon_on + "/api/ps").json()["models"][0]
    assert entry["ray"]["pipeline_parallel"] * entry["ray"]["tensor_parallel"] == 2
    assert len(entry["ray"]["nodes"]) == 1  # the one machine of this cluster
    from mgr.cli.format import ps_processor

    assert ps_processor(entry) == "Ray: 2 GPU on 1 nodes"


@pytest.mark.parametrize("daemon_on", ["down"], indirect=True)
def test_a_cluster_that_is_down_sends_the_model_to_this_machine_where_it_fits(daemon_on: str) -> None:
    answer = _chat(daemon_on)
    assert answer.status_code == 200 and "Paris" in answer.json()["message"]["content"]
    argv = runner_process(daemon_on).cmdline()
    assert "--distributed-executor-backend" not in argv and flag(argv, "--tensor-parallel-size") == "1"
    entry = httpx.get(daemon_on + "/api/ps").json()["models"][0]
    assert "ray" not in entry and entry["gpus"] == [0]


def test_a_reading_keeps_only_live_gpu_nodes_for_placement() -> None:
    reading = parse_reading("h:1", '{"nodes": ['
                            '{"id": "a", "address": "10.0.0.1", "gpus": 4, "gpu_memory": 85899345920},'
                            ' {"id": "b", "address": "10.0.0.2", "gpus": 2, "gpu_memory": 0},'
                            ' {"id": "c", "address": "10.0.0.3", "gpus": 0, "gpu_memory": 0}], "free_gpus": 5}')
    assert isinstance(reading, RayReading) and len(reading.gpu_nodes) == 2
    assert reading.cluster(Settings()) == RayCluster(2, 2, gpu_memory=80 * GIB)  # the fewest GPUs any machine has
