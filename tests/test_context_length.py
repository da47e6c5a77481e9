"""The context a model gets, set and seen: the default (Ollama's tiers by GPU memory, no more than the model was
trained for, the setting when there is one), num_ctx through the OpenAI APIs (top-level or in options, as the
real openai client sends it with extra_body), /api/ps's context_length and `mgr ps`'s CONTEXT column, and a
prompt cut to fit reported in a header and the daemon's log, never silently. Against the daemon with the real
SmolLM2 runner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Daemon, wait_for

from mgr.daemon.gpus import NvmlGpus
from mgr.daemon.memory import CONTEXT_TIERS, GIB, default_context, estimate

pytestmark = pytest.mark.slow

TRAINED = 8192  # SmolLM2-135M's llama.context_length
HEADER = "x-mgr-prompt-truncated"
# A long conversation: far more than 512 tokens, each turn ~130 of them
HISTORY = [{"role": role, "content": f"Turn {i}: " + "the quick brown fox jumps over the lazy dog " * 12}
           for i, role in enumerate(["user", "assistant"] * 4)] + [{"role": "user", "content": "Say hi."}]


# the default, as a rule --------------------------------------------------------------------------------------
def test_the_default_follows_ollamas_tiers_by_gpu_memory() -> None:
    info = {"general.architecture": "llama", "llama.block_count": 30, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.embedding_length": 576}
    small = 100 << 20
    assert [default_context(memory, None, "gguf", small, info, 4) for memory in (0, 8 * GIB, 24 * GIB, 80 * GIB)] \
        == [4096, 4096, 32768, 262144]
    assert default_context(80 * GIB, TRAINED, "gguf", small, info, 4) == TRAINED  # never past the trained length
    assert [tokens for _, tokens in CONTEXT_TIERS] == [262144, 32768, 4096]


def test_the_default_halves_until_the_model_fits_the_gpus() -> None:
    # a 40 GB model with a big KV cache on 48 GiB: 256k tokens x 4 sequences cannot fit; the largest halving that does
    info = {"general.architecture": "llama", "llama.block_count": 80, "llama.attention.head_count": 64,
            "llama.attention.head_count_kv": 8, "llama.embedding_length": 8192}
    weights, memory = 40 * 10**9, 48 * GIB
    chosen = default_context(memory, 131072, "gguf", weights, info, 4)
    assert estimate("gguf", weights, info, chosen, 4) <= memory < estimate("gguf", weights, info, chosen * 2, 4)
    assert default_context(4 * GIB, None, "gguf", 8 * GIB, info, 4) == 2048  # never below 2k, even if nothing fits


# through the daemon ----------------------------------------------------------------------------------------
def expected_default(daemon: Daemon) -> int:
    """The rule applied to what this machine has and what the daemon knows of the model."""
    shown = httpx.post(daemon.base_url + "/api/show", json={"model": "smollm2"}).json()
    memory = sum(gpu.total for gpu in NvmlGpus().gpus())
    size = sum(f["size"] for f in shown["files"])
    return default_context(memory, shown["model_info"]["llama.context_length"], "gguf", size, shown["model_info"], 4)


def ps(daemon: Daemon) -> dict[str, dict[str, object]]:
    return {m["name"]: m for m in httpx.get(daemon.base_url + "/api/ps").json()["models"]}


def test_ps_and_mgr_ps_show_the_default_context(daemon: Daemon, smollm2: str) -> None:
    httpx.post(daemon.base_url + "/api/generate", json={"model": "smollm2", "prompt": "", "stream": False},
               timeout=120).raise_for_status()
    shown = ps(daemon)["smollm2:latest"]["context_length"]
    assert shown == expected_default(daemon) and shown <= TRAINED
    table = daemon.cli("ps")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert "CONTEXT" in header.split()
    assert row[header.index("CONTEXT"):].split()[0] == str(shown)


def test_num_ctx_through_the_openai_client_reaches_the_scheduler(daemon: Daemon, smollm2: str) -> None:
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                   extra_body={"num_ctx": 2048})
    assert ps(daemon)["smollm2:latest"]["context_length"] == 2048
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=2, extra_body={"options": {"num_ctx": 1024}})
    assert ps(daemon)["smollm2:latest"]["context_length"] == 1024
    client.embeddings.create(model="smollm2", input="Hi", extra_body={"num_ctx": 1536})
    assert ps(daemon)["smollm2:latest"]["context_length"] == 1536


@pytest.mark.parametrize("body", [{"num_ctx": -1}, {"num_ctx": "big"}, {"options": {"num_ctx": 0}},
                                  {"options": "num_ctx=2048"}])
def test_a_bad_num_ctx_is_a_400_in_openais_shape(daemon: Daemon, smollm2: str, body: dict[str, object]) -> None:
    answer = httpx.post(daemon.base_url + "/v1/chat/completions", timeout=30,
                        json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_a_chat_cut_to_fit_says_so_in_a_header_and_the_log(daemon: Daemon, smollm2: str) -> None:
    def chat(num_ctx: int, stream: bool = False) -> httpx.Response:
        return httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
            "model": "smollm2", "messages": HISTORY, "stream": stream,
            "options": {"num_ctx": num_ctx, "num_predict": 4, "temperature": 0}})

    whole = chat(4096)
    assert whole.status_code == 200 and HEADER not in whole.headers  # it fits: nothing dropped, nothing said
    full = whole.json()["prompt_eval_count"]
    cut = chat(512)
    assert cut.status_code == 200, cut.text
    dropped = int(cut.headers[HEADER])
    assert dropped > 0 and cut.json()["prompt_eval_count"] == full - dropped < 512
    assert wait_for(lambda: f"{dropped} tokens dropped" in daemon.log_path.read_text())
    streamed = chat(512, stream=True)
    assert streamed.status_code == 200 and streamed.headers[HEADER] == str(dropped)
    assert streamed.text.splitlines()[-1].find('"done": true') >= 0


def test_the_openai_api_reports_truncation_too_and_refuses_silently_nothing(daemon: Daemon, smollm2: str) -> None:
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=HISTORY, max_tokens=4, extra_body={"num_ctx": 512, "truncate": True})
    assert int(raw.headers[HEADER]) > 0 and raw.parse().choices[0].message.content is not None
    streamed = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=HISTORY, max_tokens=4, stream=True, extra_body={"num_ctx": 512, "truncate": True})
    assert int(streamed.headers[HEADER]) > 0
    for _ in streamed.parse():
        pass
    # OpenAI's default is not to cut: too long is a 400 that says what to do
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2", messages=HISTORY, max_tokens=4, extra_body={"num_ctx": 512})
    assert "raise num_ctx" in refused.value.body["message"]  # type: ignore[index]


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    """A daemon whose settings set the context (MGR_CONTEXT_LENGTH, as `mgr serve --context-length`)."""
    d = Daemon(tmp_path_factory.mktemp("configured"), {"MGR_CONTEXT_LENGTH": "3072"})
    d.start()
    assert d.cli("create", "smollm2", "--from", str(gguf_path)).returncode == 0
    yield d
    d.stop()


def test_the_context_setting_wins_over_the_default(configured: Daemon) -> None:
    httpx.post(configured.base_url + "/api/generate", json={"model": "smollm2", "prompt": "", "stream": False},
               timeout=120).raise_for_status()
    assert ps(configured)["smollm2:latest"]["context_length"] == 3072
    shown = httpx.post(configured.base_url + "/api/show", json={"model": "smollm2"}).json()
    assert "num_ctx" in shown["parameters"] and "3072" in shown["parameters"]
