"""Placement: the pure rules (which GPUs, what share, when to wait, when to give up), then the scheduler
placing stand-in runners on imaginary GPUs: most-free choice, pinning, eviction for memory, learning what a
runner really uses, tensor parallelism and a clear error for a model too big for every GPU."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from fakehub import import_file
from standin.gpus import StaticGpus
from test_scheduler_policy import run, running, store, wait_until, write_tiny_gguf  # noqa: F401  (store: the fixture)

from mgr.daemon.errors import LoadFailed
from mgr.daemon.gpus import Gpu
from mgr.daemon.memory import GGUF_GPU_CONTEXT, GGUF_GPU_FIXED, VLLM_MIN_SHARE, estimate
from mgr.daemon.placement import CPU, Placement, RayCluster, TooBig, place
from mgr.daemon.scheduler import State
from mgr.registry.config import ModelOverrides
from mgr.registry.store import Store

GIB = 1 << 30
MIB = 1 << 20


def gpus(*free_gib: float, total_gib: float = 80) -> list[Gpu]:
    return [Gpu(i, "H100", int(total_gib * GIB), int(f * GIB)) for i, f in enumerate(free_gib)]


# the rules --------------------------------------------------------------------------------------------


def test_no_gpu_means_cpu_for_gguf_and_an_error_for_vllm() -> None:
    assert place("gguf", 4 * GIB, []) == CPU
    with pytest.raises(TooBig, match="needs a GPU"):
        place("safetensors", 4 * GIB, [])


def test_the_single_gpu_with_most_free_memory_that_fits() -> None:
    assert place("gguf", 10 * GIB, gpus(20, 60, 40)) == Placement((1,))
    vllm = place("safetensors", 20 * GIB, gpus(20, 60, 40))
    assert vllm is not None and vllm.gpus == (1,) and vllm.memory_fraction == pytest.approx(0.25)


def test_a_pinned_model_runs_on_all_its_gpus() -> None:
    assert place("gguf", 10 * GIB, gpus(20, 60, 40), pinned=(0, 2)) == Placement((0, 2))  # layers split over both
    assert place("gguf", 10 * GIB, gpus(20, 60, 40), pinned=(1,)) == Placement((1,))
    two = place("safetensors", 10 * GIB, gpus(80, 80), pinned=(0, 1))  # tensor parallel 2, even though one would do
    assert two is not None and two.gpus == (0, 1) and two.tensor_size == 2
    assert two.memory_fraction == pytest.approx(5 / 80)
    assert place("safetensors", 100 * GIB, gpus(40, 80), pinned=(0, 1)) is None  # once GPU 0 has room
    with pytest.raises(TooBig, match="pinned to"):
        place("safetensors", 200 * GIB, gpus(80, 80), pinned=(0, 1))
    partial = place("gguf", 300 * GIB, gpus(20, 80, 30), pinned=(0, 2), layers=40)  # 160 GiB of GPU for 300
    assert partial == Placement((0, 2), gpu_layers=6)
    with pytest.raises(TooBig, match="pinned to GPUs \\[5\\]"):
        place("gguf", 1 * GIB, gpus(20), pinned=(5,))


def test_vllm_tensor_parallel_over_the_fewest_gpus_that_fit() -> None:
    two = place("safetensors", 100 * GIB, gpus(70, 70, 70, 70))
    assert two is not None and two.gpus == (0, 1) and two.memory_fraction == pytest.approx(50 / 80)
    four = place("safetensors", 200 * GIB, gpus(60, 60, 60, 60))
    assert four is not None and four.gpus == (0, 1, 2, 3)
    with pytest.raises(TooBig, match=r"needs about 400\.0 GiB.*4 x 80\.0 GiB"):
        place("safetensors", 400 * GIB, gpus(80, 80, 80, 80))


def test_a_model_too_big_for_this_machine_goes_over_the_ray_cluster() -> None:
    cluster = RayCluster(nodes=4, gpus_per_node=8)
    placement = place("safetensors", 1000 * GIB, gpus(*[80] * 8), cluster=cluster)
    assert placement is not None and placement.pipeline_parallel == 2 and placement.tensor_size == 8
    assert placement.memory_fraction == pytest.approx(1000 / 16 / 80)
    with pytest.raises(TooBig, match="Ray cluster's 4 machines"):
        place("safetensors", 4000 * GIB, gpus(*[80] * 8), cluster=cluster)
    from test_vllm_runner import SPEC, flag

    from mgr.daemon.runners.vllm import vllm_argv

    argv = vllm_argv(SPEC, placement, 1, "/py", (0, 25, 0), ray_address="ray://head:10001")
    assert flag(argv, "--tensor-parallel-size") == "8" and flag(argv, "--pipeline-parallel-size") == "2"
    assert flag(argv, "--distributed-executor-backend") == "ray"


def test_gguf_splits_layers_then_offloads_part_then_waits() -> None:
    assert place("gguf", 100 * GIB, gpus(70, 20, 50)) == Placement((0, 2))
    # each GPU keeps 0.75 GiB for the runner's context and compute buffer: 148.5 GiB for 299.25 GiB of layers
    partial = place("gguf", 300 * GIB, gpus(80, 70), layers=40)
    assert partial == Placement((0, 1), gpu_layers=19) and partial.processor == "CPU/GPU 0,1"
    assert place("gguf", 300 * GIB, gpus(1, 1), layers=40) == CPU


def test_a_gguf_model_on_a_gpu_counts_the_runners_cuda_context() -> None:
    """On the H200 a fresh daemon placed SmolLM2 whole in 1,173 MiB free (weights + KV + compute ~1,070 MiB) and
    its KV cache failed to allocate: the runner's CUDA context (~430 MiB measured) was in no estimate."""
    info = {"general.architecture": "llama", "llama.block_count": 30, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.embedding_length": 576}
    in_ram = estimate("gguf", 98 * MIB, info, 2048, 16, on_gpu=False)
    on_gpu = estimate("gguf", 98 * MIB, info, 2048, 16)
    assert on_gpu - in_ram == GGUF_GPU_CONTEXT and on_gpu > 1_173 * MIB
    h200 = [Gpu(0, "H200", 140 * GIB, 1_173 * MIB)]
    partial = place("gguf", on_gpu, h200, layers=30, room_coming=False)
    assert partial is not None and 0 < partial.gpu_layers < 30
    # split over two GPUs, each holds a context of its own
    assert place("gguf", 10 * GIB, gpus(5.3, 5.3)) == Placement((0, 1))
    assert place("gguf", 10 * GIB, gpus(5.2, 5.2), layers=40, room_coming=False) == Placement((0, 1), gpu_layers=38)


def test_none_when_it_would_fit_after_other_models_leave() -> None:
    assert place("gguf", 50 * GIB, gpus(10, 10)) is None
    assert place("safetensors", 50 * GIB, gpus(10)) is None


def test_memory_another_process_holds_is_not_waited_for() -> None:
    """None of our models holds GPU memory (room_coming false): nothing will leave, so GGUF offloads what fits
    now and vLLM fails with the numbers, where waiting would wait for ever."""
    assert place("gguf", 50 * GIB, gpus(10, 10), layers=40, room_coming=False) == Placement((0, 1), gpu_layers=15)
    assert place("gguf", 50 * GIB, gpus(10), pinned=(0,), layers=40, room_coming=False) == \
        Placement((0,), gpu_layers=7)
    with pytest.raises(TooBig, match="10.0 GiB is free .GPU 0.; other processes hold the rest"):
        place("safetensors", 50 * GIB, gpus(10), room_coming=False)
    with pytest.raises(TooBig, match="other processes"):
        place("safetensors", 50 * GIB, gpus(10), pinned=(0,), room_coming=False)


# the scheduler on imaginary GPUs ----------------------------------------------------------------------
# the test GGUFs have no KV heads: on a GPU their estimate is the compute buffer + the CUDA context + their bytes
TINY_GGUF_NEED = GGUF_GPU_FIXED


def test_models_go_to_the_gpu_with_most_free_memory(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([1300 * MIB, 1000 * MIB])

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=cards) as h:
            (await h.scheduler.acquire("alpha")).release()
            (await h.scheduler.acquire("beta")).release()
            assert h.instance("alpha").placement.gpus == (0,)
            assert h.instance("beta").placement.gpus == (1,)  # GPU 0 has ~530 MiB left, GPU 1 has 1000
            used = {i: sum(a.get(i, 0) for a in cards.allocations.values()) for i in (0, 1)}
            assert used[0] >= TINY_GGUF_NEED and used[1] >= TINY_GGUF_NEED

    run(scenario)


def test_pinned_model_goes_where_the_config_says(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([1600 * MIB, 1000 * MIB])

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=cards,
                           models={"alpha:latest": ModelOverrides(gpus=(1,))}) as h:
            (await h.scheduler.acquire("alpha")).release()
            assert h.instance("alpha").placement.gpus == (1,)

    run(scenario)


def test_idle_model_evicted_for_memory_busy_one_never(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([1000 * MIB])  # room for one tiny model at a time

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=cards, max_loaded_models=5) as h:
            busy = await h.scheduler.acquire("alpha")
            waiting = __import__("asyncio").ensure_future(h.scheduler.acquire("beta"))
            await wait_until(lambda: "beta" in h.loaded())
            assert h.loaded() == {"alpha": State.READY, "beta": State.PENDING}  # alpha is busy: kept
            busy.release()  # idle now: evicted for beta's memory
            lease = await waiting
            assert lease.instance.placement.gpus == (0,) and "alpha" not in h.loaded()
            assert all(cards.used_by(pid) == {} for pid in h.factory.pids("alpha"))
            lease.release()

    run(scenario)


def test_what_a_runner_really_uses_replaces_the_estimate(store: Store, tmp_path: Path) -> None:
    cards = StaticGpus([1000 * MIB])

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=cards, actual_bytes={"alpha": 100 * MIB}) as h:
            first = h.scheduler.spec_for("alpha")
            assert first.estimate > TINY_GGUF_NEED - MIB
            (await h.scheduler.acquire("alpha")).release()
            assert h.instance("alpha").measured == {0: 100 * MIB}
            assert h.scheduler.spec_for("alpha").estimate == 100 * MIB  # learned

    run(scenario)


def test_a_runner_holding_part_of_the_layers_teaches_nothing(store: Store, tmp_path: Path) -> None:
    """What a runner with part of its layers on the GPU uses is not what the whole model needs: learned, it would
    place the model whole next time, into memory too small for it."""
    path = tmp_path / "layered.gguf"
    write_tiny_gguf(path, "layered", layers=40, rows=10 * MIB // 32)  # 10 MiB of weights
    store.create("layered", files={"layered.gguf": import_file(store, path)}, source={"test": "placement"})
    cards = StaticGpus([1000 * MIB])
    cards.allocate(1, 0, 1000 * MIB - GGUF_GPU_FIXED - 5 * MIB)  # another process: room for half the layers

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=cards, actual_bytes={"layered": 300 * MIB}) as h:
            before = h.scheduler.spec_for("layered").estimate
            (await h.scheduler.acquire("layered")).release()
            assert h.instance("layered").placement == Placement((0,), gpu_layers=19)
            assert h.instance("layered").measured == {0: 300 * MIB}
            assert h.scheduler.spec_for("layered").estimate == before  # not learned

    run(scenario)


def _safetensors_model(store: Store, tmp_path: Path, name: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    header = json.dumps({"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    store.create(name, {"config.json": import_file(store, config),
                        "model.safetensors": import_file(store, weights)}, {"test": "placement"})


def test_vllm_model_tensor_parallel_and_too_big(store: Store, tmp_path: Path) -> None:
    _safetensors_model(store, tmp_path, "vl")
    need = VLLM_MIN_SHARE  # the tiny safetensors model gets the smallest share vLLM is given

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=StaticGpus([int(need * 0.6)] * 4)) as h:
            (await h.scheduler.acquire("vl")).release()
            assert h.instance("vl").placement.gpus == (0, 1)  # half the model on each of two GPUs
        async with running(store, tmp_path, gpus=StaticGpus([int(need * 0.1)] * 2)) as h:
            with pytest.raises(LoadFailed, match="needs about 6.0 GiB"):
                await h.scheduler.acquire("vl")

    run(scenario)


def test_a_gpu_filled_by_another_process_does_not_hold_a_load_for_ever(store: Store, tmp_path: Path) -> None:
    """A shared workstation: someone else's process holds most of the GPU. No model of ours could make room, so
    the GGUF model loads where it can now (here, its one layer does not fit: on the CPU) instead of waiting."""
    cards = StaticGpus([1000 * MIB])
    cards.allocate(1, 0, 950 * MIB)  # not a runner of ours

    async def scenario() -> None:
        async with running(store, tmp_path, gpus=cards) as h:
            lease = await h.scheduler.acquire("alpha")
            assert lease.instance.placement == CPU
            lease.release()

    run(scenario, timeout=15)
