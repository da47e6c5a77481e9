"""Images on the llama.cpp runner (issue 11, item 5): the real SmolLM2 GGUF with the tiny random-weight mmproj of
standin/tiny_vision.py (a real CLIP encoder + "mlp" projector, 16 image tokens per picture), through the runner
process over HTTP as the daemon talks to it, and through the real daemon with the real ollama and openai clients.

The projector's weights are random, so what the model says about the picture is nonsense: these tests prove the
path (data URLs decoded, the image encoded and decoded into the request's sequence, tokens generated after it,
the image's tokens counted, the 400s), never the words.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, wait_for
from serving import start_llama_runner
from standin.tiny_vision import N_IMAGE_TOKENS, write_tiny_mmproj

pytestmark = pytest.mark.slow
PARALLEL = 4
CTX = 512
QUESTION = "What is in this picture?"


def png(width: int, height: int) -> bytes:
    """A small RGB gradient PNG, written with zlib and struct only."""
    rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, (x + y) * 8 % 256))
                                       for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PNG = png(24, 16)
OTHER_PNG = png(10, 30)


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def with_images(*urls: str, text: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *(image_part(u) for u in urls)]}]


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmproj(tmp_path_factory.mktemp("vision") / "mmproj-tiny-f16.gguf", n_embd=576)


def start_runner(gguf: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    return start_llama_runner(gguf, log_path, "--parallel", str(PARALLEL), "--ctx-size", str(CTX),
                              "--served-model-name", "smol", *extra)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def runner(gguf_path: Path, mmproj: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One runner with the projector, shared by the module's runner tests."""
    log = tmp_path_factory.mktemp("runner") / "runner.log"
    process, url = start_runner(gguf_path, log, "--mmproj", str(mmproj))
    try:
        assert wait_for(lambda: healthy(url) or process.poll() is not None, timeout=90)
        assert process.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def post(url: str, messages: list[dict[str, Any]], **params: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, **params},
                      timeout=120)


def text_prompt_tokens(url: str, text: str) -> int:
    answer = post(url, [{"role": "user", "content": text}], max_tokens=1)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["usage"]["prompt_tokens"])


def test_a_chat_with_an_image_generates_and_counts_the_image_tokens(runner: str) -> None:
    answer = post(runner, with_images(data_url(PNG)), temperature=0)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["message"]["content"]
    # the image takes the place of its marker: the question's tokens plus the 16 of the image
    assert body["usage"]["prompt_tokens"] == text_prompt_tokens(runner, QUESTION) + N_IMAGE_TOKENS
    # the same picture, the same greedy answer: the image really goes into the sequence, and only into its own
    again = post(runner, with_images(data_url(PNG)), temperature=0).json()
    assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]


def test_a_streamed_chat_with_an_image(runner: str) -> None:
    body = {"messages": with_images(data_url(PNG)), "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces, usage = [], None
    with httpx.stream("POST", runner + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces)
    assert usage is not None and usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] == text_prompt_tokens(runner, QUESTION) + N_IMAGE_TOKENS


def test_two_images_count_twice(runner: str) -> None:
    answer = post(runner, with_images(data_url(PNG), data_url(OTHER_PNG)))
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == text_prompt_tokens(runner, QUESTION) + 2 * N_IMAGE_TOKENS


def test_images_next_to_plain_requests_leave_them_unchanged(runner: str) -> None:
    """An image prompt prefilled while plain requests generate does not change their greedy answers."""
    prompts = ["Write two sentences about cats.", "Write two sentences about the sea."]
    alone = [post(runner, [{"role": "user", "content": p}], max_tokens=24, temperature=0).json()
             ["choices"][0]["message"]["content"] for p in prompts]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            calls = [client.post(runner + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0}) for p in prompts]
            calls.insert(1, client.post(runner + "/v1/chat/completions", json={
                "messages": with_images(data_url(PNG)), "max_tokens": 24}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [responses[0].json()["choices"][0]["message"]["content"],
            responses[2].json()["choices"][0]["message"]["content"]] == alone


def test_an_image_with_logprobs_and_two_choices(runner: str) -> None:
    answer = post(runner, with_images(data_url(PNG)), n=2, logprobs=True, top_logprobs=2)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert len(choices) == 2 and all(c["logprobs"]["content"] for c in choices)


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64,not base64!", "not valid base64"),
    ("data:image/png," + "abc", "must be base64"),
    ("http://example.com/cat.png", "data: URLs"),
    ("https://example.com/cat.png", "data: URLs"),
    (data_url(b"this is no picture"), "is not a PNG"),
    (data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "could not be decoded"),  # a PNG's magic, broken inside
])
def test_bad_images_are_400s(runner: str, url: str, words: str) -> None:
    answer = post(runner, with_images(url))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert healthy(runner)  # the engine thread lives on
    assert post(runner, with_images(data_url(PNG))).status_code == 200


def test_an_image_prompt_too_long_is_a_400_and_text_still_truncates(runner: str) -> None:
    long = "word " * 600  # more than CTX tokens
    messages = [{"role": "user", "content": long}, {"role": "assistant", "content": "Yes."},
                *with_images(data_url(PNG))]
    answer = post(runner, messages, truncate=True)
    assert answer.status_code == 400 and "context" in answer.json()["error"]["message"]
    text_only = [{"role": "user", "content": long}, {"role": "assistant", "content": "Yes."},
                 {"role": "user", "content": QUESTION}]
    assert post(runner, text_only, truncate=True).status_code == 200


def test_a_runner_without_a_projector_refuses_images(gguf_path: Path, tmp_path: Path) -> None:
    process, url = start_runner(gguf_path, tmp_path / "runner.log")
    try:
        assert wait_for(lambda: healthy(url), timeout=60)
        answer = post(url, with_images(data_url(PNG)))
        assert answer.status_code == 400
        assert answer.json()["error"]["message"] == "the model does not support images"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_projector_for_another_model_fails_the_load(gguf_path: Path, tmp_path: Path) -> None:
    wrong = write_tiny_mmproj(tmp_path / "mmproj-wrong.gguf", n_embd=64)
    process, _ = start_runner(gguf_path, tmp_path / "runner.log", "--mmproj", str(wrong))
    try:
        assert process.wait(timeout=60) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "could not be loaded for this model" in (tmp_path / "runner.log").read_text()


# through the daemon, with the real clients -----------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_model(daemon: Daemon, gguf_path: Path, mmproj: Path) -> str:
    """SmolLM2 and the tiny projector uploaded as blobs and created as one model."""
    files = {}
    for name, path in (("SmolLM2-135M-Instruct.Q4_1.gguf", gguf_path), ("mmproj-tiny-f16.gguf", mmproj)):
        data = path.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        uploaded = httpx.post(daemon.base_url + f"/api/blobs/{digest}", content=data, timeout=120)
        assert uploaded.status_code in (200, 201), uploaded.text
        files[name] = digest
    created = httpx.post(daemon.base_url + "/api/create", json={"model": "smolvision", "files": files,
                                                                "stream": False}, timeout=120)
    assert created.status_code == 200, created.text
    return "smolvision:latest"


def test_show_lists_vision(daemon: Daemon, vision_model: str) -> None:
    shown = httpx.post(daemon.base_url + "/api/show", json={"model": vision_model}).json()
    assert "vision" in shown["capabilities"]


def test_ollama_chat_and_generate_with_images(daemon: Daemon, vision_model: str) -> None:
    import ollama

    client = ollama.Client(host=daemon.base_url, timeout=300)
    options = {"num_predict": 8}
    chat = client.chat(vision_model, messages=[{"role": "user", "content": QUESTION, "images": [PNG]}],
                       options=options)
    assert chat.message.content and chat.eval_count
    as_base64 = client.chat(vision_model, options=options, messages=[
        {"role": "user", "content": QUESTION, "images": [base64.b64encode(PNG).decode()]}])
    assert as_base64.prompt_eval_count == chat.prompt_eval_count
    text_only = client.chat(vision_model, messages=[{"role": "user", "content": QUESTION}], options=options)
    assert chat.prompt_eval_count == text_only.prompt_eval_count + N_IMAGE_TOKENS
    generated = client.generate(vision_model, prompt=QUESTION, images=[PNG, OTHER_PNG], options=options)
    assert generated.response and generated.eval_count
    streamed = list(client.chat(vision_model, messages=[{"role": "user", "content": QUESTION, "images": [PNG]}],
                                options=options, stream=True))
    assert "".join(part.message.content or "" for part in streamed) and streamed[-1].done


def test_openai_chat_with_an_image_url(daemon: Daemon, vision_model: str) -> None:
    import openai

    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", timeout=300)
    answer = client.chat.completions.create(model=vision_model, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}])
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > N_IMAGE_TOKENS
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=vision_model, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
