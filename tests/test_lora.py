"""A LoRA adapter on llama.cpp (issue 12 item 4): tiny real GGUF LoRA adapters for SmolLM2, written here with
gguf-py as llama.cpp's convert_lora_to_gguf.py writes them (general.type adapter, adapter.type lora,
adapter.lora.alpha, blk.N.attn_q.weight.lora_a / lora_b), created over the real model through the real ollama
client and a Modelfile through the real CLI, answered by the real llama.cpp runner. An adapter whose B matrices
are zero changes nothing (the answer is the base's, token for token); one with random weights changes it."""

from __future__ import annotations

from pathlib import Path

import gguf
import httpx
import numpy as np
import ollama
import pytest
from conftest import Daemon

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 12}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# SmolLM2-135M: 30 blocks, 576 wide, 9 query heads and 3 key/value heads of 64
LAYERS, WIDTH, KV_WIDTH = 30, 576, 192


def lora_gguf(path: Path, architecture: str = "llama", scale: float = 0.0, rank: int = 8) -> Path:
    """A LoRA adapter on every block's attn_q and attn_v: A is (rank, in), B (out, rank) as numpy shapes (gguf-py
    reverses them into llama.cpp's ne order); B is `scale` times standard normal (0: the adapter adds nothing)."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    for block in range(LAYERS):
        for tensor, out in (("attn_q", WIDTH), ("attn_v", KV_WIDTH)):
            name = f"blk.{block}.{tensor}.weight"
            writer.add_tensor(f"{name}.lora_a", rng.standard_normal((rank, WIDTH)).astype(np.float32) * 0.1)
            writer.add_tensor(f"{name}.lora_b", rng.standard_normal((out, rank)).astype(np.float32) * scale)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def client(daemon: Daemon, smollm2: str) -> ollama.Client:
    return ollama.Client(host=daemon.base_url)


def _answer(client: ollama.Client, model: str) -> str:
    return client.chat(model, messages=QUESTION, options=GREEDY).message.content or ""


def test_an_adapter_changes_the_answer_and_a_zero_one_does_not(client: ollama.Client, daemon: Daemon,
                                                                tmp_path: Path) -> None:
    base = _answer(client, "smollm2")
    zero = client.create_blob(lora_gguf(tmp_path / "zero.gguf"))
    client.create("smol-zero-lora", from_="smollm2", adapters={"zero.gguf": zero})
    assert _answer(client, "smol-zero-lora") == base  # B = 0: the adapter is applied and adds nothing
    strong = client.create_blob(lora_gguf(tmp_path / "strong.gguf", scale=0.5))
    client.create("smol-lora", from_="smollm2", adapters={"strong.gguf": strong})
    adapted = _answer(client, "smol-lora")
    assert adapted and adapted != base
    assert _answer(client, "smol-lora") == adapted  # the same adapter, the same greedy answer
    shown = client.show("smol-lora")
    assert f"\nADAPTER {Path(daemon.env['MGR_MODELS']) / 'blobs' / strong.replace(':', '-')}\n" in (
        shown.modelfile or "")
    runner = next(p for p in daemon.runner_processes() if "smol-lora" in " ".join(p.cmdline()))
    assert "--lora" in runner.cmdline()


def test_an_adapter_through_a_modelfile(client: ollama.Client, daemon: Daemon, tmp_path: Path) -> None:
    lora_gguf(tmp_path / "adapter.gguf", scale=0.5)
    (tmp_path / "Modelfile").write_text("FROM smollm2\nADAPTER ./adapter.gguf\nPARAMETER num_predict 12\n")
    made = daemon.cli("create", "smol-lora-file", "-f", str(tmp_path / "Modelfile"))
    assert made.returncode == 0, made.stderr
    assert _answer(client, "smol-lora-file") == _answer(client, "smol-lora")  # the same bytes: the same blob


def test_an_adapter_for_another_architecture_or_not_an_adapter_is_a_400(client: ollama.Client, daemon: Daemon,
                                                                       gguf_path: Path, tmp_path: Path) -> None:
    other = client.create_blob(lora_gguf(tmp_path / "qwen.gguf", architecture="qwen2"))
    model = client.create_blob(gguf_path)
    for adapters, words in (({"qwen.gguf": other}, "is for 'qwen2' models, not 'llama'"),
                            ({"smol.gguf": model}, "is not a GGUF LoRA adapter"),
                            ({"a.gguf": other, "b.gguf": model}, "one GGUF LoRA adapter file")):
        answer = httpx.post(daemon.base_url + "/api/create",
                            json={"model": "bad-lora", "from": "smollm2", "adapters": adapters, "stream": False})
        assert answer.status_code == 400 and words in answer.json()["error"], answer.text


def test_the_vllm_command_line_serves_a_peft_adapter_under_the_models_name(tmp_path: Path) -> None:
    """vLLM applies a LoRA to the requests that name it: the model's own name is the adapter's, so every request
    mgr relays goes through it; the base answers to another name. The rank rounds up to one vLLM allows."""
    from mgr.daemon.placement import Placement
    from mgr.daemon.runners.base import LoadSpec
    from mgr.daemon.runners.vllm import lora_rank, vllm_argv

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 24, "lora_alpha": 48, "peft_type": "LORA"}')
    spec = LoadSpec(name="smol-lora:latest", digest="d" * 64, format="safetensors", model_path=Path("/m/links/abc"),
                    num_ctx=2048, num_parallel=8, size=1, adapter=adapter, chat_template="{{ messages }}")
    argv = vllm_argv(spec, Placement((0,), memory_fraction=0.1), 40001, "/py", (0, 25, 0),
                     chat_template_file=tmp_path / "t.jinja")
    assert argv[argv.index("--served-model-name") + 1] == "smol-lora:latest-base"
    assert argv[argv.index("--lora-modules") + 1] == f"smol-lora:latest={adapter}"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "32"
    assert argv[argv.index("--chat-template") + 1] == str(tmp_path / "t.jinja")
    assert lora_rank(tmp_path) == 16  # no adapter_config.json: vLLM's default
    plain = vllm_argv(LoadSpec(name="smol:latest", digest="d" * 64, format="safetensors", model_path=Path("/m"),
                               num_ctx=2048, num_parallel=8, size=1), Placement((0,)), 40001, "/py", (0, 25, 0))
    assert argv[argv.index("--served-model-name") + 1] != plain[plain.index("--served-model-name") + 1]
    assert "--enable-lora" not in plain and "--chat-template" not in plain
