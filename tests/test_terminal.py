"""`mgr` as an Ollama user drives it in a terminal: `mgr run` flags in any position, word wrap, a pasted block,
/save and /load, history across sessions, the exit code of an answer cut off, auto-pull and an offline pull's
message, `mgr create` progress, the daemon's lifecycle by pid, OLLAMA_HOST, client timeouts, `mgr rm`, and two
names of one model file sharing one runner. Real daemon, real llama.cpp runner on the real GGUF, pexpect ptys."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from conftest import QUESTION, Daemon, free_port, wait_for
from fakehub import FakeHub, dead_endpoint, tiny_gguf

pytestmark = pytest.mark.slow
REPO = "test/SmolLM2-135M-Instruct-GGUF"
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x08⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]")


def spawn(daemon: Daemon, *args: str, columns: int = 100, env: dict[str, str] | None = None) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "mgr.cli", *args], env=env or daemon.env, encoding="utf-8",
                         timeout=90, dimensions=(24, columns))


def screen_text(raw: str) -> str:
    """What a terminal shows, roughly: spinner frames, backspaces and escape sequences removed."""
    return CONTROL.sub("", raw.replace(" \x08", "")).replace("\r\n", "\n").replace("\r", "")


def test_run_takes_flags_anywhere_and_verbose_prints_ollamas_timings(daemon: Daemon, smollm2: str) -> None:
    flags_last = daemon.cli("run", "smollm2", "--verbose", QUESTION, "--temperature", "0", "--num-predict", "30")
    assert flags_last.returncode == 0, flags_last.stderr
    assert "Paris" in flags_last.stdout
    for label in ("total duration:", "load duration:", "prompt eval count:", "prompt eval rate:", "eval count:",
                  "eval duration:", "eval rate:"):
        assert label in flags_last.stderr
    flags_first = daemon.cli("run", "--temperature", "0", "--keepalive", "1m", "smollm2", "--num-predict", "30",
                             "--nowordwrap", "--insecure", QUESTION)
    assert flags_first.returncode == 0 and flags_first.stdout == flags_last.stdout
    unknown = daemon.cli("run", "smollm2", "--bogus", "hi")
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: mgr run")
    assert "unrecognized arguments: --bogus" in unknown.stderr
    thinking = daemon.cli("run", "smollm2", "--think", "hi")  # SmolLM2 cannot think: Ollama's 400, exit 1
    assert thinking.returncode == 1 and "thinking" in thinking.stderr


def test_run_format_takes_json_or_a_schema_file(daemon: Daemon, smollm2: str, tmp_path: Path) -> None:
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"]}))
    answer = daemon.cli("run", "smollm2", "What is the capital of France?", "--format", str(schema),
                        "--temperature", "0", "--num-predict", "60")
    assert answer.returncode == 0, answer.stderr
    assert isinstance(json.loads(answer.stdout)["city"], str)
    missing = daemon.cli("run", "smollm2", "hi", "--format", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "--format" in missing.stderr


def test_answer_is_word_wrapped_at_the_terminal_width(daemon: Daemon, smollm2: str) -> None:
    prompt = "Describe Paris in three long sentences."
    plain = daemon.cli("run", "smollm2", prompt, "--temperature", "0", "--num-predict", "50")
    child = spawn(daemon, "run", "smollm2", prompt, "--temperature", "0", "--num-predict", "50", columns=40)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    shown = screen_text(child.before)
    lines = [line for line in shown.split("\n") if line.strip()]
    assert len(lines) > 3 and max(len(line) for line in lines) <= 40
    assert shown.split() == plain.stdout.split()  # the same words: only line breaks moved, no word split


def test_chat_paste_save_load_and_history(daemon: Daemon, smollm2: str) -> None:
    child = spawn(daemon, "run", "smollm2", "--temperature", "0", "--num-predict", "20")
    try:
        child.expect(">>> ")
        # a bracketed paste of three lines: one message, answered once
        child.send("\x1b[200~My name is Ada.\nI live in Paris.\nSay hi.\x1b[201~")
        child.send("\r")
        child.expect(">>> ")
        child.sendline("/set parameter nonsense 3")
        child.expect("Couldn't set parameter: unknown parameter 'nonsense'")
        child.sendline("/set parameter temperature 0.1")
        child.expect("Set parameter 'temperature' to '0.1'")
        child.sendline("/save adasession")
        child.expect("Created new model 'adasession'")
        child.sendline("/load adasession")
        child.expect("Loading model 'adasession'")
        child.expect(">>> ")
        child.sendline("/show system")
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    saved = httpx.post(daemon.base_url + "/api/show", json={"model": "adasession"}).json()
    users = [m for m in saved["messages"] if m["role"] == "user"]
    assert [m["content"] for m in users] == ["My name is Ada.\nI live in Paris.\nSay hi."]
    assert len([m for m in saved["messages"] if m["role"] == "assistant"]) == 1
    assert "temperature" in saved["parameters"]
    history = Path(daemon.env["MGR_STATE_DIR"]) / "history"
    assert "/load adasession" in history.read_text()
    # a new session recalls the last one's lines: up three times is "/load adasession" (before "/show system"
    # and "/bye")
    again = spawn(daemon, "run", "smollm2")
    try:
        again.expect(">>> ")
        again.send("\x1b[A\x1b[A\x1b[A")
        again.send("\r")
        again.expect("Loading model 'adasession'")
        again.expect(">>> ")
        again.sendeof()
        again.expect(pexpect.EOF)
    finally:
        again.close(force=True)


def test_aliases_share_one_runner(daemon: Daemon, smollm2: str) -> None:
    assert daemon.cli("cp", "smollm2", "twin").returncode == 0
    body = {"stream": False, "options": {"temperature": 0, "num_predict": 5},
            "messages": [{"role": "user", "content": QUESTION}]}
    first = httpx.post(daemon.base_url + "/api/chat", json={"model": "smollm2", **body}, timeout=120).json()
    second = httpx.post(daemon.base_url + "/api/chat", json={"model": "twin", **body}, timeout=120).json()
    assert first["model"] == "smollm2:latest" and second["model"] == "twin:latest"  # each answers as itself
    assert first["message"]["content"] == second["message"]["content"]
    assert len(daemon.runner_pids()) == 1
    running = httpx.get(daemon.base_url + "/api/ps").json()["models"]
    assert [m["name"] for m in running] == ["twin:latest"]  # one runner, shown under the name last asked for
    httpx.post(daemon.base_url + "/api/chat", json={"model": "smollm2", **body}, timeout=120)
    running = httpx.get(daemon.base_url + "/api/ps").json()["models"]
    assert [m["name"] for m in running] == ["smollm2:latest"] and len(daemon.runner_pids()) == 1


def test_ps_fits_100_columns_and_rm_of_a_missing_model(daemon: Daemon, smollm2: str) -> None:
    httpx.post(daemon.base_url + "/api/generate", json={"model": smollm2}, timeout=120)
    ps = daemon.cli("ps")
    assert ps.returncode == 0 and "CONTEXT" in ps.stdout.splitlines()[0]
    assert max(len(line) for line in ps.stdout.splitlines()) <= 100
    rm = daemon.cli("rm", "nonexistent")
    assert rm.returncode == 1 and rm.stderr.strip() == "Error: model 'nonexistent' not found"


def test_create_checks_the_name_first_and_shows_hashing_and_upload(daemon: Daemon, tmp_path: Path) -> None:
    bad = daemon.cli("create", "bad name!", "--from", str(tmp_path / "missing.gguf"))
    assert bad.returncode == 1 and "name" in bad.stderr and "missing.gguf" not in bad.stderr
    model = tmp_path / "tiny.gguf"
    model.write_bytes(tiny_gguf("progress", n_floats=1 << 18, tmp_dir=tmp_path))
    child = spawn(daemon, "create", "tinyprogress", "--from", str(model))
    child.expect(r"hashing tiny\.gguf 100%")
    child.expect(r"uploading tiny\.gguf 100%")
    child.expect("success")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ollama_host_is_the_clis_fallback(daemon: Daemon) -> None:
    env = {k: v for k, v in daemon.env.items() if k != "MGR_HOST"}
    env["OLLAMA_HOST"] = f"127.0.0.1:{daemon.port}"
    listing = subprocess.run([sys.executable, "-m", "mgr.cli", "list"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0 and listing.stdout.startswith("NAME")


def test_a_daemon_that_never_answers_times_out(daemon: Daemon) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {**daemon.env, "MGR_HOST": f"127.0.0.1:{silent.getsockname()[1]}", "MGR_CLIENT_TIMEOUT": "1"}
        for args in (["list"], ["run", "smollm2", "hi"]):
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=env, capture_output=True,
                                    text=True, timeout=30)
            assert result.returncode == 1 and "did not answer within 1s" in result.stderr
            assert time.monotonic() - started < 10


def test_detached_daemon_starts_and_stops_by_its_pid(daemon: Daemon, tmp_path: Path) -> None:
    port = free_port()
    env = {**daemon.env, "MGR_HOST": f"127.0.0.1:{port}", "MGR_STATE_DIR": str(tmp_path / "state"),
           "MGR_MODELS": str(tmp_path / "models")}

    def mgr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=env, capture_output=True, text=True,
                              timeout=90)

    started = mgr("serve", "--detach")
    assert started.returncode == 0, started.stderr
    pid = int(re.search(r"\(pid (\d+)\)", started.stdout).group(1))  # type: ignore[union-attr]
    status = mgr("status")
    assert status.returncode == 0 and f"pid {pid}" in status.stdout and str(port) in status.stdout
    # a second daemon on the busy port: one line, before anything says it listens
    busy = mgr("serve")
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1 and "could not listen" in busy.stderr
    assert "listening" not in busy.stderr.replace("could not listen", "")
    stopped = mgr("stop-server")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    assert mgr("status").returncode == 1
    assert httpx.get(daemon.base_url + "/api/version").status_code == 200  # the other daemon is untouched


# -- a daemon killed mid-answer ------------------------------------------------------------------------------


def test_an_answer_cut_off_by_a_dead_daemon_exits_1(tmp_path: Path, gguf_path: Path) -> None:
    doomed = Daemon(tmp_path)
    doomed.start()
    try:
        assert doomed.cli("create", "smollm2", "--from", str(gguf_path)).returncode == 0
        run = subprocess.Popen([sys.executable, "-m", "mgr.cli", "run", "smollm2", "Write a long story about a cat.",
                                "--num-predict", "500"], env=doomed.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert run.stdout is not None
        run.stdout.read(20)  # the answer has begun
        assert doomed.process is not None
        os.kill(doomed.process.pid, signal.SIGKILL)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1
        assert "cut off" in err and err.startswith("Error:")
    finally:
        doomed.stop()
        for pid in doomed.runner_pids():
            os.kill(pid, signal.SIGKILL)


# -- pulls from a hub ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pulling_daemon(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    hub = FakeHub().start()
    hub.add_repo("hf", REPO, {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf_path})
    d = Daemon(tmp_path_factory.mktemp("pull"), extra_env={
        "MGR_HF_ENDPOINT": hub.hf_endpoint, "MGR_HF_MIRROR_ENDPOINT": dead_endpoint(),
        "MGR_MODELSCOPE_ENDPOINT": dead_endpoint(), "HF_HUB_DISABLE_XET": "1",
    })
    d.start()
    yield d
    d.stop()
    hub.stop()


def test_run_pulls_a_missing_model_first(pulling_daemon: Daemon) -> None:
    answer = pulling_daemon.cli("run", f"hf.co/{REPO}:Q4_1", QUESTION, "--temperature", "0", "--num-predict", "30")
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout and "pulling" not in answer.stdout  # the pull's progress is on stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in answer.stderr and f"pulled hf.co/{REPO}:Q4_1" in answer.stderr
    again = pulling_daemon.cli("pull", f"hf.co/{REPO}:Q4_1")
    assert again.returncode == 0 and "is up to date" in again.stdout and "MB/s" not in again.stdout


def test_an_unreachable_hub_is_one_line_that_says_what_to_do(pulling_daemon: Daemon) -> None:
    env = {**pulling_daemon.env, "MGR_HF_ENDPOINT": "http://elsewhere.example"}
    result = subprocess.run([sys.executable, "-m", "mgr.cli", "pull", f"hf-mirror.com/{REPO}"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("note: MGR_HF_ENDPOINT") and "read by the daemon" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("Error: cannot reach 127.0.0.1:")
    assert "MGR_HF_ENDPOINT" in lines[1] and "MGR_SOURCES" in lines[1]
