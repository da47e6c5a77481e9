"""GET /metrics against the real daemon and the real SmolLM2 runner: the counters, histograms and gauges move as
requests flow through each API (the ollama, openai and anthropic client libraries), and match what the answers
themselves report."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from conftest import Daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MODEL = "smollm2:latest"


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    """A daemon whose model answers one request at a time, so that others queue."""
    d = Daemon(tmp_path_factory.mktemp("metrics"), {"MGR_NUM_PARALLEL": "1"})
    d.start()
    created = d.cli("create", "smollm2", "--from", str(gguf_path))
    assert created.returncode == 0, created.stderr
    yield d
    d.stop()


def scrape(daemon: Daemon) -> Samples:
    response = httpx.get(daemon.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def test_counters_and_histograms_follow_requests(one_slot: Daemon) -> None:
    before = scrape(one_slot)
    assert value(before, "mgr_runner_state", model=MODEL, state="ready", backend="llama.cpp") == 0

    chat = ollama.Client(host=one_slot.base_url).chat(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], options={"num_predict": 12})
    client = openai.OpenAI(base_url=one_slot.base_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8)
    assert completion.usage is not None
    message = anthropic.Anthropic(base_url=one_slot.base_url, api_key="unused").messages.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Say hello."}])

    after = scrape(one_slot)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for endpoint in ("/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/messages"):
        assert moved("mgr_requests_total", model=MODEL, endpoint=endpoint, status="200") == 1, endpoint
    assert chat.prompt_eval_count and chat.eval_count
    prompt = chat.prompt_eval_count + usage.prompt_tokens + completion.usage.prompt_tokens \
        + message.usage.input_tokens
    generated = chat.eval_count + usage.completion_tokens + completion.usage.completion_tokens \
        + message.usage.output_tokens
    assert moved("mgr_prompt_tokens_total", model=MODEL) == prompt
    assert moved("mgr_generation_tokens_total", model=MODEL) == generated
    # Time to first token for the three answers that streamed from the runner through mgr (the whole OpenAI
    # completion came at once); the gaps between their chunks are the inter-token latencies.
    assert moved("mgr_time_to_first_token_seconds_count", model=MODEL) == 3
    # ... each at least as long as the prompt's processing the runner reported for the Ollama one
    assert moved("mgr_time_to_first_token_seconds_sum", model=MODEL) * 1e9 >= chat.prompt_eval_duration
    assert moved("mgr_inter_token_latency_seconds_count", model=MODEL) >= 3
    # The first request loaded the model, once.
    assert moved("mgr_runner_transition_seconds_count", model=MODEL, transition="load", reason="request") == 1
    assert moved("mgr_runner_transition_seconds_sum", model=MODEL, transition="load", reason="request") > 0
    assert value(after, "mgr_runner_state", model=MODEL, state="ready", backend="llama.cpp") == 1
    assert value(after, "mgr_requests_in_flight", model=MODEL) == 0
    assert value(after, "mgr_requests_queued", model=MODEL) == 0
    # An unknown path has one label value, whatever was asked.
    assert httpx.get(one_slot.base_url + "/no/such/path/123", timeout=10).status_code == 404
    assert value(scrape(one_slot), "mgr_requests_total", model="", endpoint="other", status="404") >= 1


def test_queue_and_in_flight_gauges(one_slot: Daemon) -> None:
    """One slot: while a long answer streams, the next requests wait, and the gauges say so."""
    before = scrape(one_slot)
    first_chunk = threading.Event()
    errors: list[BaseException] = []

    def stream(prompt: str) -> None:
        try:
            for _ in ollama.Client(host=one_slot.base_url).generate(
                    model=MODEL, prompt=prompt, stream=True, options={"num_predict": 24, "temperature": 0}):
                first_chunk.set()
        except BaseException as e:  # reported by the test below
            errors.append(e)

    prompt = "Count from one to two hundred in words, separated by commas:"
    threads = [threading.Thread(target=stream, args=(prompt,))]
    threads[0].start()
    assert first_chunk.wait(60)
    threads += [threading.Thread(target=stream, args=(prompt,)) for _ in range(2)]
    for thread in threads[1:]:
        thread.start()
    seen: list[tuple[float, float]] = []

    def queued() -> bool:
        samples = scrape(one_slot)
        seen.append((value(samples, "mgr_requests_in_flight", model=MODEL),
                     value(samples, "mgr_requests_queued", model=MODEL)))
        return seen[-1][1] >= 1

    assert wait_for(queued, timeout=30, interval=0.02), seen
    assert seen[-1][0] == 1  # one slot, busy
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    after = scrape(one_slot)
    assert value(after, "mgr_requests_queued", model=MODEL) == 0
    assert value(after, "mgr_requests_in_flight", model=MODEL) == 0
    waited = value(after, "mgr_queue_wait_seconds_count", model=MODEL) \
        - value(before, "mgr_queue_wait_seconds_count", model=MODEL)
    assert waited >= 1
    assert value(after, "mgr_queue_wait_seconds_sum", model=MODEL) > value(before, "mgr_queue_wait_seconds_sum",
                                                                          model=MODEL)


def test_unload_reasons(one_slot: Daemon) -> None:
    """An unload asked for (keep_alive 0) is a "request"; a keep_alive that runs out is "idle"."""
    before = scrape(one_slot)
    client = ollama.Client(host=one_slot.base_url)
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})  # loaded (again, perhaps)
    client.generate(model=MODEL, prompt="", keep_alive=0)

    def unloads(reason: str) -> float:
        return value(scrape(one_slot), "mgr_runner_transition_seconds_count", model=MODEL, transition="unload",
                     reason=reason) - value(before, "mgr_runner_transition_seconds_count", model=MODEL,
                                            transition="unload", reason=reason)

    assert wait_for(lambda: unloads("request") == 1, timeout=30)
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive="1s")
    assert wait_for(lambda: unloads("idle") == 1, timeout=30)
    after = scrape(one_slot)
    assert value(after, "mgr_runner_state", model=MODEL, state="ready", backend="llama.cpp") == 0
    loads = value(after, "mgr_runner_transition_seconds_count", model=MODEL, transition="load", reason="request") \
        - value(before, "mgr_runner_transition_seconds_count", model=MODEL, transition="load", reason="request")
    was_loaded = value(before, "mgr_runner_state", model=MODEL, state="ready", backend="llama.cpp") == 1
    assert loads == (1 if was_loaded else 2)  # the keep_alive 1s one, and the first one unless it was loaded


def test_gpu_memory_per_device_and_per_runner_at_scrape_time() -> None:
    """What /metrics reads at scrape time, from the GpuInventory and the scheduler's snapshots (this machine has
    no GPU: imaginary ones, and a snapshot as a loaded runner on two of them would give)."""
    from mgr.daemon.gpus import Gpu
    from mgr.daemon.instances import InstanceStatus, State
    from mgr.daemon.metrics import exposition
    from mgr.daemon.placement import Placement

    gib = 1 << 30
    gpus = [Gpu(0, "H200", 141 * gib, 100 * gib), Gpu(1, "H200", 141 * gib, 120 * gib)]
    runner = InstanceStatus(name="qwen:7b", digest="d", state=State.READY, backend="vllm", size=30 * gib,
                            size_vram=30 * gib, gpus=(0, 1), context_length=4096, num_parallel=256, active=3,
                            queued=2, expires_at=None, loaded_at=None, draining=False,
                            placement=Placement(gpus=(0, 1), memory_fraction=0.2))
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition([runner], gpus).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert value(samples, "mgr_gpu_memory_total_bytes", gpu="0", name="H200") == 141 * gib
    assert value(samples, "mgr_gpu_memory_free_bytes", gpu="1", name="H200") == 120 * gib
    assert value(samples, "mgr_runner_gpu_memory_bytes", model="qwen:7b") == 30 * gib
    assert value(samples, "mgr_requests_in_flight", model="qwen:7b") == 3
    assert value(samples, "mgr_requests_queued", model="qwen:7b") == 2
    assert value(samples, "mgr_runner_state", model="qwen:7b", state="ready", backend="vllm") == 1


def test_pull_bytes_and_speed(tmp_path: Path, gguf_path: Path) -> None:
    """A pull from a local fake hub (the Hugging Face protocol) through the daemon: its bytes and speed."""
    from fakehub import FakeHub, dead_endpoint

    hub = FakeHub().start()
    hub.add_repo("hf", "test/SmolLM2-GGUF", {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf_path, "README.md": b"# hi\n"})
    daemon = Daemon(tmp_path, {"MGR_HF_ENDPOINT": hub.hf_endpoint, "MGR_HF_MIRROR_ENDPOINT": dead_endpoint(),
                               "MGR_MODELSCOPE_ENDPOINT": dead_endpoint(), "HF_HUB_DISABLE_XET": "1"})
    daemon.start()
    try:
        before = scrape(daemon)
        assert value(before, "mgr_pull_bytes_total") == 0
        with httpx.stream("POST", daemon.base_url + "/api/pull", timeout=300,
                          json={"model": "hf.co/test/SmolLM2-GGUF:Q4_1"}) as response:
            assert response.status_code == 200
            lines = list(response.iter_lines())
        assert '"success"' in lines[-1]
        after = scrape(daemon)
        size = gguf_path.stat().st_size
        assert size <= value(after, "mgr_pull_bytes_total") <= size + 1024  # the weights (and the small files)
        assert value(after, "mgr_pulls_total", outcome="success") == 1
        assert value(after, "mgr_pull_speed_bytes_per_second") > 0
    finally:
        daemon.stop()
        hub.stop()
