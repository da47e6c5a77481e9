"""No request takes the llama.cpp runner down: bad text, injected failures in its engine thread, grammars nested
too deep, sampling fields out of range, fields of the wrong shape, and a long chat that needs truncation. Each
through the real daemon and the real runner on the real GGUF, with the real clients where they can send it; after
each, the same runner process answers the next request (or, where the engine cannot go on, a new one does).

Failures are injected through the runner's test hook (faults.py), which exists only when the runner starts with
MGR_RUNNER_FAULTS=1 (the daemon's environment passes it on); the request field `mgr_fault` reaches the runner
through the OpenAI API, which passes fields it does not read through."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import QUESTION, Daemon, wait_for
from serving import NotServing, start_llama_runner, wait_until_serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CONTEXT = 512  # small, so that a long chat needs truncation and its prompt is one batch
MODEL = "smollm2"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("mgr-faults"), {
        "MGR_RUNNER_FAULTS": "1", "MGR_NUM_PARALLEL": "2", "MGR_CONTEXT_LENGTH": str(CONTEXT)})
    daemon.start()
    try:
        created = daemon.cli("create", MODEL, "--from", str(gguf_path))
        assert created.returncode == 0, created.stderr
        yield daemon
    finally:
        daemon.stop()


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(daemon: Daemon, **extra: object) -> str:
    """One short greedy answer through the OpenAI client: the model still answers."""
    answer = client(daemon).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12,
        extra_body=extra or None)
    text = answer.choices[0].message.content
    assert text
    return text


def runner_pid(daemon: Daemon) -> int:
    [runner] = daemon.runner_processes()
    return runner.pid


def runner_url(daemon: Daemon) -> str:
    [runner] = daemon.runner_processes()
    argv = runner.cmdline()
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"


def runner_secret(daemon: Daemon) -> dict[str, str]:
    """The header a daemon's runner wants on every request but /health (the secret the daemon gave it)."""
    [runner] = daemon.runner_processes()
    return {"Authorization": f"Bearer {runner.environ()['MGR_RUNNER_SECRET']}"}


def post_raw(url: str, raw: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url, content=raw, headers={"Content-Type": "application/json", **(headers or {})}, timeout=120)


def test_a_lone_surrogate_is_a_400_everywhere_and_the_next_request_is_answered(faulty: Daemon) -> None:
    ask(faulty)
    pid = runner_pid(faulty)
    half_an_emoji = b'"Hello \\ud83d"'
    ollama = post_raw(faulty.base_url + "/api/chat",
                      b'{"model": "smollm2", "messages": [{"role": "user", "content": ' + half_an_emoji + b"}]}")
    assert ollama.status_code == 400 and "surrogate" in ollama.json()["error"]
    openai_api = post_raw(faulty.base_url + "/v1/chat/completions",
                          b'{"model": "smollm2", "messages": [{"role": "user", "content": ' + half_an_emoji + b"}]}")
    assert openai_api.status_code == 400
    assert openai_api.json()["error"]["type"] == "invalid_request_error"
    assert "messages[0].content" in openai_api.json()["error"]["message"]
    # the runner is an HTTP server too: it refuses the text itself, before its tokenizer could see it
    direct = post_raw(runner_url(faulty) + "/v1/completions", b'{"prompt": ' + half_an_emoji + b', "max_tokens": 2}',
                      runner_secret(faulty))
    assert direct.status_code == 400 and "surrogate" in direct.json()["error"]["message"]
    # a whole emoji (a valid pair) is text like any other
    whole = post_raw(faulty.base_url + "/v1/chat/completions", b'{"model": "smollm2", "max_tokens": 3, "messages": '
                     b'[{"role": "user", "content": "Hello \\ud83d\\ude00"}]}')
    assert whole.status_code == 200
    assert "Paris" in ask(faulty) and runner_pid(faulty) == pid


def test_an_exception_in_the_engine_thread_fails_only_its_request(faulty: Daemon) -> None:
    ask(faulty)
    pid = runner_pid(faulty)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(faulty, mgr_fault="start")
    message = caught.value.message
    assert "InjectedFault" in message and "Traceback" not in message and "engine.py" not in message
    # one that fails in the middle of its answer: the text so far, then the stream's last event is the error
    texts = []
    with pytest.raises(openai.APIError, match="InjectedFault"):
        for chunk in client(faulty).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=20, stream=True,
                extra_body={"mgr_fault": "sample"}):
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts)  # the first token came before the failure
    assert "Paris" in ask(faulty)
    assert runner_pid(faulty) == pid  # the same process, its engine going on
    health = httpx.get(runner_url(faulty) + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0  # no slot was lost to the failures


def test_an_engine_that_cannot_go_on_ends_its_runner_which_starts_again(faulty: Daemon) -> None:
    ask(faulty)
    pid = runner_pid(faulty)
    with pytest.raises(openai.APIStatusError) as caught:
        ask(faulty, mgr_fault="engine")
    assert caught.value.status_code == 502 and "model runner" in caught.value.message
    assert wait_for(lambda: pid not in faulty.runner_pids(), timeout=10)
    assert "Paris" in ask(faulty)  # a new runner
    assert runner_pid(faulty) != pid
    assert "runner exited unexpectedly (code 70)" in faulty.log_path.read_text()


def test_a_grammar_nested_too_deep_is_a_400_and_the_runner_stays_up(faulty: Daemon) -> None:
    ask(faulty)
    pid = runner_pid(faulty)
    # nested 100,000 deep: what crashed the runner (SIGSEGV in llama.cpp's recursive parser). Its 200 kB go to
    # the runner directly: the daemon's header guard (guards.py) takes a large body's first read for headers.
    deepest = json.dumps({"prompt": "Hi", "max_tokens": 2,
                          "grammar": "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000}).encode()
    direct = post_raw(runner_url(faulty) + "/v1/completions", deepest, runner_secret(faulty))
    assert direct.status_code == 400 and "grammar" in direct.json()["error"]["message"]
    # through the daemon: nested 1,000 deep, short enough to pass the size check, too deep all the same
    with pytest.raises(openai.BadRequestError, match="grammar nests groups 1000 deep"):
        ask(faulty, grammar="root ::= " + "(" * 1_000 + '"a"' + ")" * 1_000)
    with pytest.raises(openai.BadRequestError, match="grammar must be a string"):
        ask(faulty, grammar=["root"])
    # a sane grammar still works: the answer is what it allows
    assert ask(faulty, grammar='root ::= "yes" | "no"') in ("yes", "no")
    assert "Paris" in ask(faulty) and runner_pid(faulty) == pid


def test_sampling_fields_out_of_range_are_400s(faulty: Daemon) -> None:
    ask(faulty)
    pid = runner_pid(faulty)
    ollama = httpx.post(faulty.base_url + "/api/generate", timeout=60, json={
        "model": MODEL, "prompt": QUESTION, "stream": False, "options": {"repeat_last_n": 50_000_000}})
    assert ollama.status_code == 400 and "repeat_last_n" in ollama.json()["error"]
    assert f"{CONTEXT}" in ollama.json()["error"]  # at most the context
    for field, value in (("repeat_last_n", 50_000_000), ("top_k", 10**12), ("temperature", -1), ("top_p", 2),
                         ("repetition_penalty", 0), ("logit_bias", {"1": 1000}), ("stop", ["x"] * 100)):
        with pytest.raises(openai.BadRequestError, match=field):
            ask(faulty, **{field: value})
    assert "Paris" in ask(faulty, repeat_last_n=-1, top_k=-1)  # the whole context, and off: accepted
    assert runner_pid(faulty) == pid


def test_fields_of_the_wrong_shape_are_400s_before_generation_starts(faulty: Daemon) -> None:
    ask(faulty)
    url = faulty.base_url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400}
    for extra in ({"stream": True, "stream_options": "x"}, {"stream_options": {"include_usage": "yes"}},
                  {"chat_template_kwargs": "x"}, {"chat_template_kwargs": [1]},
                  {"chat_template_kwargs": {"messages": []}}):
        answer = httpx.post(url, json={**base, **extra}, timeout=60)
        assert answer.status_code == 400, (extra, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"]["type"] == "invalid_request_error"
    # nothing was left generating (the stream_options one used to run on after its 500)
    health = httpx.get(runner_url(faulty) + "/health").json()
    assert health["active"] == 0 and health["waiting"] == 0


def test_a_300_message_chat_that_needs_truncation_holds_no_other_client(faulty: Daemon) -> None:
    """The chat's prompt is rendered, tokenized and cut in a worker thread of its request, in a few renders:
    another client's 4-token request, sent while that goes on, is not held by it for more than a second.

    Every older message is longer than the context, so only the newest fits: 299 messages to drop, what cost
    the one-by-one truncation most (a render and a tokenization of the whole rest per message, on the engine
    thread, while every other request waited in its inbox). What is measured is how long the short request
    waited outside the engine (its latency less the engine's own prompt and generation times, which the
    runner reports): sharing the engine's batches with the long chat's prompt is this 2-core machine's CPU,
    shared with other test runs, and varies by seconds from one request to the next."""
    context = 256  # both requests ask for it: one runner serves them
    ask(faulty)
    paragraph = "A few words about the sea, the mountains, bread, trains, winter and libraries. " * 20
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i}: {paragraph}"}
                for i in range(299)] + [{"role": "user", "content": QUESTION}]

    async def waited(http: httpx.AsyncClient) -> float:
        """Seconds the short request spent outside the engine: in the daemon, the runner's handler, its inbox."""
        started = time.monotonic()
        answer = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "num_ctx": context})
        took = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
        timings = answer.json()["timings"]
        return took - (timings["prompt_ms"] + timings["predicted_ms"]) / 1000

    async def both() -> tuple[float, float, dict[str, object]]:
        async with httpx.AsyncClient(base_url=faulty.base_url, timeout=300) as http:
            alone = max([await waited(http) for _ in range(3)])
            long_chat = asyncio.create_task(http.post("/api/chat", json={
                "model": MODEL, "messages": messages, "stream": False,
                "options": {"num_predict": 4, "num_ctx": context}}))
            await asyncio.sleep(0.05)  # the long chat is being prepared
            during = await waited(http)
            answer = await long_chat
            assert answer.status_code == 200, answer.text
            return alone, during, answer.json()

    alone, during, long_answer = asyncio.run(both())
    assert during < alone + 1.0, (alone, during)
    # it was cut to fit: only the newest message is left (the template adds a system prompt of its own)
    assert 0 < long_answer["prompt_eval_count"] < 80  # type: ignore[operator]
    assert long_answer["done_reason"] == "length"


def test_a_cancelled_waiter_does_not_block_the_runners_stop(gguf_path: Path, tmp_path: Path) -> None:
    """A request waiting for the runner's only sequence slot whose client leaves is answered at once: the
    runner's SIGTERM, which waits for its requests, then ends in seconds (it used to wait for ever)."""
    process, url = start_llama_runner(gguf_path, tmp_path / "runner.log", "--parallel", "1", "--ctx-size", "4096")
    try:
        try:
            wait_until_serving(url + "/health", process, 90)
        except NotServing as e:
            raise RuntimeError(f"the runner {e}:\n{(tmp_path / 'runner.log').read_text()[-3000:]}") from None
        port = int(url.rsplit(":", 1)[1])
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 3000,
                "ignore_eos": True, "stream": True}) as holder:
            lines = holder.iter_lines()  # kept: an iterator dropped would close the stream
            next(lines)  # it holds the slot
            payload = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5}).encode()
            waiting = socket.create_connection(("127.0.0.1", port))
            waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            assert wait_for(lambda: httpx.get(url + "/health").json()["waiting"] == 1, timeout=10)
            waiting.close()  # its client leaves while it waits
            time.sleep(0.3)
        # the holder has gone too; now stop the runner
        process.terminate()
        started = time.monotonic()
        process.wait(timeout=15)
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
