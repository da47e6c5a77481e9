"""End to end: a real daemon, the real SmolLM2-135M-Instruct GGUF on the real llama.cpp runner, real HTTP over
loopback, and the real `ollama` and `openai` client libraries and the `mgr` CLI as users run them."""

from __future__ import annotations

import json
import os
import signal
import sys

import httpx
import ollama
import openai
import pexpect
import psutil
import pytest
from conftest import QUESTION, Daemon, wait_for

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "num_predict": 40}


def test_cli_create_and_list(daemon: Daemon, smollm2: str) -> None:
    listing = daemon.cli("list")
    assert listing.returncode == 0
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert row.split()[0] == smollm2 and row.split()[2:4] == ["98", "MB"]
    tags = httpx.get(daemon.base_url + "/api/tags").json()["models"]
    assert tags[0]["details"]["format"] == "gguf"
    assert tags[0]["details"]["family"] == "llama"
    assert tags[0]["details"]["quantization_level"] == "Q4_1"


def test_api_chat_streaming(daemon: Daemon, smollm2: str) -> None:
    lines = []
    with httpx.stream("POST", daemon.base_url + "/api/chat", timeout=120, json={
        "model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "options": GREEDY,
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) > 2 and all(not line["done"] for line in lines[:-1])
    answer = "".join(line["message"]["content"] for line in lines)
    assert "Paris" in answer
    final = lines[-1]
    assert final["done"] and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] > 10 and final["eval_count"] > 2
    for key in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert final["total_duration"] >= final["eval_duration"]


def test_api_chat_not_streaming(daemon: Daemon, smollm2: str) -> None:
    answer = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        "model": smollm2, "stream": False, "messages": [{"role": "user", "content": QUESTION}], "options": GREEDY,
    }).json()
    assert "Paris" in answer["message"]["content"] and answer["message"]["role"] == "assistant"
    assert answer["done"] is True and answer["done_reason"] == "stop" and answer["eval_count"] > 0


def test_api_generate_streaming_and_not(daemon: Daemon, smollm2: str) -> None:
    with httpx.stream("POST", daemon.base_url + "/api/generate", timeout=120,
                      json={"model": smollm2, "prompt": QUESTION, "options": GREEDY}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "Paris" in "".join(line["response"] for line in lines)
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] > 0
    whole = httpx.post(daemon.base_url + "/api/generate", timeout=120,
                       json={"model": smollm2, "prompt": QUESTION, "options": GREEDY, "stream": False}).json()
    assert "Paris" in whole["response"] and whole["done"] is True
    # the streamed and the whole answer are the same greedy text
    assert whole["response"] == "".join(line["response"] for line in lines)


def test_generate_raw_skips_the_template(daemon: Daemon, smollm2: str) -> None:
    answer = httpx.post(daemon.base_url + "/api/generate", timeout=120, json={
        "model": smollm2, "prompt": "The capital of France is", "raw": True, "stream": False,
        "options": {"temperature": 0, "num_predict": 5},
    }).json()
    assert "Paris" in answer["response"]
    assert answer["done_reason"] == "length" and answer["eval_count"] == 5


def test_ollama_python_client(daemon: Daemon, smollm2: str) -> None:
    client = ollama.Client(host=daemon.base_url)
    response = client.chat(model=smollm2, messages=[{"role": "user", "content": QUESTION}], options=GREEDY)
    assert "Paris" in response.message.content and response.done_reason == "stop"
    pieces = list(client.generate(model=smollm2, prompt=QUESTION, options=GREEDY, stream=True))
    assert "Paris" in "".join(p.response for p in pieces) and pieces[-1].done
    assert [m.model for m in client.list().models] == [smollm2]
    running = client.ps().models
    assert [m.model for m in running] == [smollm2] and running[0].expires_at is not None
    assert client.show(smollm2).details.family == "llama"


def test_openai_python_client(daemon: Daemon, smollm2: str) -> None:
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused")
    completion = client.chat.completions.create(
        model=smollm2, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40)
    assert "Paris" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 10 and completion.usage.completion_tokens > 2
    stream = client.chat.completions.create(
        model=smollm2, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [smollm2]
    raw = client.completions.create(model=smollm2, prompt="The capital of France is", temperature=0, max_tokens=5)
    assert "Paris" in raw.choices[0].text


def test_mgr_run_one_shot_and_piped(daemon: Daemon, smollm2: str) -> None:
    result = daemon.cli("run", "smollm2", QUESTION, "--temperature", "0", "--num-predict", "40")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    piped = daemon.cli("run", "smollm2", "--temperature", "0", input=QUESTION + "\n")
    assert piped.returncode == 0 and "Paris" in piped.stdout


def test_mgr_run_interactive(daemon: Daemon, smollm2: str) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "mgr.cli", "run", "smollm2", "--temperature", "0"],
                          env=daemon.env, encoding="utf-8", timeout=60)
    try:
        child.expect(">>> ")
        child.sendline(QUESTION)
        child.expect("Paris")
        child.expect(">>> ")
        child.sendline('"""')  # multi-line input
        child.sendline("Repeat the last city you named.")
        child.sendline('Answer with one word."""')
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_mgr_ps_and_stop(daemon: Daemon, smollm2: str) -> None:
    httpx.post(daemon.base_url + "/api/generate", json={"model": smollm2, "prompt": QUESTION, "stream": False,
                                                        "options": GREEDY}, timeout=120)
    ps = daemon.cli("ps")
    assert ps.returncode == 0
    assert ps.stdout.split("\n")[0].split()[:4] == ["NAME", "ID", "SIZE", "PROCESSOR"]
    row = ps.stdout.splitlines()[1]
    assert row.startswith(smollm2) and "CPU" in row and "llama.cpp" in row and "0/4" in row
    assert daemon.runner_processes()
    stop = daemon.cli("stop", "smollm2")
    assert stop.returncode == 0, stop.stderr
    assert httpx.get(daemon.base_url + "/api/ps").json()["models"] == []
    assert wait_for(lambda: not daemon.runner_processes(), timeout=15)


def test_load_and_unload_forms(daemon: Daemon, smollm2: str) -> None:
    loaded = httpx.post(daemon.base_url + "/api/generate", json={"model": smollm2}, timeout=120)
    assert json.loads(loaded.text.splitlines()[0])["done_reason"] == "load"
    assert [m["name"] for m in httpx.get(daemon.base_url + "/api/ps").json()["models"]] == [smollm2]
    unloaded = httpx.post(daemon.base_url + "/api/chat",
                          json={"model": smollm2, "messages": [], "keep_alive": 0, "stream": False}, timeout=60)
    assert unloaded.json()["done_reason"] == "unload"
    assert httpx.get(daemon.base_url + "/api/ps").json()["models"] == []


def test_explicit_load_unload_and_queue(daemon: Daemon, smollm2: str) -> None:
    loaded = httpx.post(daemon.base_url + "/api/load", json={"model": smollm2, "keep_alive": "1m"}, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"
    queue = httpx.get(daemon.base_url + "/api/queue").json()
    assert queue["models"] == [{"name": smollm2, "state": "ready", "active": 0, "queued": 0, "num_parallel": 4}]
    assert queue["queued"] == 0 and queue["max_queue"] == 512
    unloaded = httpx.post(daemon.base_url + "/api/unload", json={"model": smollm2}, timeout=60)
    assert unloaded.json()["done_reason"] == "unload"
    assert httpx.get(daemon.base_url + "/api/queue").json()["models"] == []
    assert httpx.post(daemon.base_url + "/api/load", json={"model": "nope"}).status_code == 404


def test_keep_alive_zero_unloads_after_the_request(daemon: Daemon, smollm2: str) -> None:
    answer = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        "model": smollm2, "stream": False, "keep_alive": 0, "options": GREEDY,
        "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert "Paris" in answer["message"]["content"]
    assert wait_for(lambda: not httpx.get(daemon.base_url + "/api/ps").json()["models"], timeout=15)
    assert wait_for(lambda: not daemon.runner_processes(), timeout=15)


def test_embeddings_through_both_apis(daemon: Daemon, smollm2: str) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    embedded = ollama.Client(host=daemon.base_url).embed(model=smollm2, input=texts)
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 576
    legacy = httpx.post(daemon.base_url + "/api/embeddings", json={"model": smollm2, "prompt": texts[0]}).json()
    assert legacy["embedding"] == pytest.approx(embedded.embeddings[0], abs=1e-5)
    vectors = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x").embeddings.create(
        model=smollm2, input=texts)
    assert [d.embedding for d in vectors.data] == [pytest.approx(e, abs=1e-5) for e in embedded.embeddings]
    assert vectors.usage.prompt_tokens > 5


# bad input ---------------------------------------------------------------------------------------------


def test_unknown_model_is_404_everywhere(daemon: Daemon, smollm2: str) -> None:
    expected = 'model "nope" not found, try pulling it first'
    for path, body in (
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/generate", {"model": "nope", "prompt": "hi"}),
        ("/api/show", {"model": "nope"}),
    ):
        response = httpx.post(daemon.base_url + path, json=body)
        assert response.status_code == 404 and response.json() == {"error": expected}, path
    with pytest.raises(openai.NotFoundError) as caught:
        openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x").chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}])
    assert expected in str(caught.value)
    run = daemon.cli("run", "nope", "hi")
    assert run.returncode == 1 and 'model "nope" not found' in run.stderr and "Traceback" not in run.stderr
    assert httpx.request("DELETE", daemon.base_url + "/api/delete", json={"model": "nope"}).status_code == 404


def test_malformed_requests_are_400(daemon: Daemon, smollm2: str) -> None:
    url = daemon.base_url
    cases = [
        ("/api/chat", b"{not json"),
        ("/api/chat", json.dumps({"messages": []}).encode()),  # no model
        ("/api/chat", json.dumps({"model": smollm2, "messages": "hi"}).encode()),
        ("/api/generate", json.dumps({"model": smollm2, "prompt": "hi", "options": {"temperature": "hot"}}).encode()),
        ("/api/generate", json.dumps({"model": smollm2, "prompt": 5}).encode()),
        ("/api/generate", json.dumps({"model": "../../etc/passwd", "prompt": "hi"}).encode()),
        ("/v1/chat/completions", json.dumps({"model": smollm2}).encode()),
        ("/api/blobs/sha256:xyz", b"data"),
    ]
    for path, body in cases:
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, body, response.text)
        error = response.json()["error"]
        assert (error["message"] if isinstance(error, dict) else error), path
    # unknown options are ignored, as Ollama does (LangChain sends mirostat, tfs_z)
    ok = httpx.post(url + "/api/generate", timeout=120, json={
        "model": smollm2, "prompt": QUESTION, "stream": False, "options": {**GREEDY, "mirostat": 0, "tfs_z": 1}})
    assert ok.status_code == 200 and "Paris" in ok.json()["response"]


def test_create_refuses_a_file_that_is_not_gguf(daemon: Daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a model" * 100)
    models = daemon.env["MGR_MODELS"]
    before = sorted(os.listdir(os.path.join(models, "blobs")))
    result = daemon.cli("create", "broken", "--from", str(fake))
    assert result.returncode == 1 and "not a GGUF file" in result.stderr
    # the API refuses it too when a client uploads it anyway, and keeps nothing of it
    import hashlib

    digest = "sha256:" + hashlib.sha256(fake.read_bytes()).hexdigest()
    assert httpx.post(daemon.base_url + f"/api/blobs/{digest}", content=fake.read_bytes()).status_code == 201
    created = httpx.post(daemon.base_url + "/api/create", json={"model": "broken", "files": {"fake.gguf": digest}})
    assert created.status_code == 400 and "not a GGUF file" in created.json()["error"]
    assert sorted(os.listdir(os.path.join(models, "blobs"))) == before
    assert "broken" not in daemon.cli("list").stdout
    # an upload whose bytes do not match its digest is refused and leaves no blob
    wrong = "sha256:" + "0" * 64
    assert httpx.post(daemon.base_url + f"/api/blobs/{wrong}", content=b"abc").status_code == 400
    assert sorted(os.listdir(os.path.join(models, "blobs"))) == before
    assert os.listdir(os.path.join(models, "tmp")) == []


def test_create_from_a_safetensors_folder(daemon: Daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "tiny-st"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048,
              "num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 1, "num_key_value_heads": 1}
    (folder / "config.json").write_text(json.dumps(config))
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(32))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not taken")
    created = daemon.cli("create", "tiny-st", "--from", str(folder))
    assert created.returncode == 0, created.stderr
    shown = httpx.post(daemon.base_url + "/api/show", json={"model": "tiny-st"}).json()
    assert shown["details"]["format"] == "safetensors" and shown["details"]["family"] == "llama"
    assert shown["model_info"]["general.parameter_count"] == 16
    assert sorted(f["path"] for f in shown["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    # vLLM serves safetensors; without it the request fails clearly, and nothing is left running
    answer = httpx.post(daemon.base_url + "/api/generate", json={"model": "tiny-st", "prompt": "hi"}, timeout=60)
    try:
        assert answer.status_code == 501 and "vLLM" in answer.json()["error"]
        assert "tiny-st:latest" not in [m["name"] for m in httpx.get(daemon.base_url + "/api/ps").json()["models"]]
    finally:
        assert daemon.cli("rm", "tiny-st").returncode == 0


def test_systemd_unit_runs_mgr_serve() -> None:
    import configparser
    from pathlib import Path

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parent.parent / "systemd" / "mgr.service")
    assert unit["Service"]["ExecStart"].split()[1:] == ["serve"]
    assert unit["Service"]["Restart"] == "on-failure" and unit["Service"]["KillMode"] == "mixed"  # issue 14
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_cli_without_daemon_says_how_to_start_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import free_port

    env = dict(os.environ, MGR_HOST=f"127.0.0.1:{free_port()}", MGR_CONFIG=str(tmp_path / "none.toml"))
    import subprocess

    for args in (["list"], ["ps"], ["run", "smollm2", "hi"]):
        result = subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=env, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=30)
        assert result.returncode == 1
        assert "could not connect to mgr" in result.stderr and "mgr serve" in result.stderr
        assert "Traceback" not in result.stderr


def test_runner_killed_mid_answer(daemon: Daemon, smollm2: str) -> None:
    lines: list[dict] = []
    with httpx.stream("POST", daemon.base_url + "/api/generate", timeout=120, json={
        "model": smollm2, "prompt": "Write a very long story about a dragon.",
        "options": {"temperature": 0.8, "seed": 1, "num_predict": 2000},
    }) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(json.loads(line))
            if len(lines) == 5:
                for runner in daemon.runner_processes():
                    os.kill(runner.pid, signal.SIGKILL)
    assert len(lines) > 5
    assert "error" in lines[-1] and "runner" in lines[-1]["error"], lines[-1]
    assert not any(line.get("done") for line in lines)
    # the daemon noticed at once (without a new request), and the next request starts a new runner
    assert wait_for(lambda: httpx.get(daemon.base_url + "/api/ps").json()["models"] == [], timeout=10)
    answer = httpx.post(daemon.base_url + "/api/chat", timeout=120, json={
        "model": smollm2, "stream": False, "messages": [{"role": "user", "content": QUESTION}], "options": GREEDY})
    assert answer.status_code == 200 and "Paris" in answer.json()["message"]["content"]


def test_openai_stream_closed_by_the_client_frees_its_slot(daemon: Daemon, smollm2: str) -> None:
    """The OpenAI relay runs outside the router: a client that drops a stream must still release the
    daemon's lease and make the runner stop generating."""
    with httpx.stream("POST", daemon.base_url + "/v1/chat/completions", timeout=120, json={
            "model": smollm2, "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(5), lines) if line.startswith("data: {")) >= 2
    [runner] = daemon.runner_processes()
    port = runner.cmdline()[runner.cmdline().index("--port") + 1]

    def idle() -> bool:
        [model] = httpx.get(daemon.base_url + "/api/ps").json()["models"]
        return model["active"] == 0 and httpx.get(f"http://127.0.0.1:{port}/health").json()["active"] == 0
    assert wait_for(idle, timeout=15)


def test_openai_stream_from_a_runner_that_dies_ends_with_an_error_event(daemon: Daemon, smollm2: str) -> None:
    events: list[str] = []
    with httpx.stream("POST", daemon.base_url + "/v1/completions", timeout=120, json={
            "model": smollm2, "prompt": "Once upon a time", "stream": True, "max_tokens": 2000,
            "ignore_eos": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    for runner in daemon.runner_processes():
                        os.kill(runner.pid, signal.SIGKILL)
    assert len(events) > 3 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == 502
    assert wait_for(lambda: httpx.get(daemon.base_url + "/api/ps").json()["models"] == [], timeout=10)


def test_rm_removes_manifest_and_blobs(daemon: Daemon, smollm2: str) -> None:
    from pathlib import Path

    from mgr.registry.store import Store

    copy = httpx.post(daemon.base_url + "/api/copy", json={"source": smollm2, "destination": "smol-copy"})
    assert copy.status_code == 200
    store = Store(Path(daemon.env["MGR_MODELS"]))
    # blobs other tests uploaded stay through their grace period; these are the model's own
    own = {store.blob_path(digest) for digest in store.get(smollm2).blob_digests}
    assert own and store.get("smol-copy").blob_digests == store.get(smollm2).blob_digests  # shared, not copied
    removed = daemon.cli("rm", "smol-copy")
    assert removed.returncode == 0 and "deleted 'smol-copy'" in removed.stdout
    assert all(path.is_file() for path in own)  # still used by smollm2
    removed = daemon.cli("rm", smollm2)
    assert removed.returncode == 0
    assert not any(path.exists() for path in own)
    assert daemon.cli("list").stdout.splitlines()[1:] == []


def test_daemon_stop_leaves_no_runner(tmp_path, gguf_path) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path)
    d.start()
    try:
        assert d.cli("create", "smollm2", "--from", str(gguf_path)).returncode == 0
        assert "Paris" in d.cli("run", "smollm2", QUESTION, "--temperature", "0").stdout
        assert d.runner_processes()
    finally:
        runners = d.stop()
    # uvicorn re-raises SIGTERM once its graceful shutdown is complete; systemd counts that as a clean exit
    assert runners and d.process is not None and d.process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in d.log_path.read_text()
    assert wait_for(lambda: not any(psutil.pid_exists(pid) for pid in runners), timeout=10)
