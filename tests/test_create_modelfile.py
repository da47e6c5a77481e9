"""Create as Ollama does (issue 12 item 4), through the real ollama and openai clients and the real `mgr` CLI
against the real daemon, on the real llama.cpp runner with SmolLM2: a model derived with `from` shares its base's
blobs and carries a system prompt, parameters and history that every request on it gets (the request's own values
winning), /api/show reports them in Ollama's text forms, a Modelfile builds the same through `mgr create -f`, a
TEMPLATE replaces the model's chat template, and the version and keep-alive forms that clients check."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from conftest import Daemon

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "seed": 1}
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
SYSTEM = "You are a pirate. Answer every question like a pirate would, in one sentence."


@pytest.fixture(scope="module")
def client(daemon: Daemon, smollm2: str) -> ollama.Client:
    return ollama.Client(host=daemon.base_url)


def _show(daemon: Daemon, model: str) -> dict[str, Any]:
    """/api/show as sent (the ollama client's ShowResponse has no `system` or `messages`)."""
    answer: dict[str, Any] = httpx.post(daemon.base_url + "/api/show", json={"model": model}).json()
    return answer


def _blobs(daemon: Daemon) -> list[str]:
    return sorted(p.name for p in (Path(daemon.env["MGR_MODELS"]) / "blobs").iterdir())


def _prompt_tokens(client: ollama.Client, model: str, messages: list[dict[str, str]]) -> int:
    answer = client.chat(model, messages=messages, options={**GREEDY, "num_predict": 1})
    return int(answer.prompt_eval_count or 0)


def test_a_derived_model_shares_its_blobs_and_show_reports_its_settings(client: ollama.Client,
                                                                         daemon: Daemon) -> None:
    before = _blobs(daemon)
    done = client.create("pirate", from_="smollm2", system=SYSTEM,
                         parameters={"num_predict": 5, "stop": ["<|im_end|>", "Arr"], "temperature": 0.3})
    assert done.status == "success"
    assert _blobs(daemon) == before  # no blob copied: its manifest names the base's
    shown = client.show("pirate")
    base = client.show("smollm2")
    assert _show(daemon, "pirate")["system"] == SYSTEM and _show(daemon, "smollm2")["system"] == ""
    lines = (shown.parameters or "").splitlines()
    assert f"{'num_predict':<30} 5" in lines and f"{'temperature':<30} 0.3" in lines
    assert f"{'stop':<30} \"Arr\"" in lines and f"{'stop':<30} \"<|im_end|>\"" in lines
    assert any(re.fullmatch(r"num_ctx +\d+", line) for line in lines)  # the context it loads with, always
    assert shown.modelfile is not None
    assert f"SYSTEM {SYSTEM}\n" in shown.modelfile and "PARAMETER num_predict 5\n" in shown.modelfile
    assert "PARAMETER stop Arr\n" in shown.modelfile and "\nFROM /" in shown.modelfile
    assert shown.template == base.template and shown.capabilities == base.capabilities
    assert shown.details.parent_model == "smollm2:latest"
    assert _show(daemon, "pirate")["files"] == _show(daemon, "smollm2")["files"]


def test_the_models_parameters_apply_and_the_requests_own_win(client: ollama.Client, daemon: Daemon) -> None:
    client.create("brief", from_="smollm2", parameters={"num_predict": 3, "temperature": 0})
    capped = client.chat("brief", messages=QUESTION)
    assert capped.eval_count == 3 and capped.done_reason == "length"
    longer = client.chat("brief", messages=QUESTION, options={"num_predict": 9})
    assert longer.eval_count is not None and 3 < longer.eval_count <= 9  # the request's option wins
    # the model's temperature 0 is greedy: the same answer every time, where Ollama's default 0.8 would vary
    assert client.chat("brief", messages=QUESTION).message.content == capped.message.content
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    answer = api.chat.completions.create(model="brief", messages=QUESTION)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    answer = api.chat.completions.create(model="brief", messages=QUESTION, max_tokens=7)  # type: ignore[arg-type]
    assert answer.usage is not None and 3 < answer.usage.completion_tokens <= 7


def test_a_stop_word_from_the_parameters_ends_the_answer(client: ollama.Client) -> None:
    plain = client.chat("smollm2", messages=QUESTION, options={**GREEDY, "num_predict": 40}).message.content
    words = re.findall(r"[A-Za-z]{4,}", plain)
    assert len(words) >= 3, plain
    stop = words[2]
    client.create("stopper", from_="smollm2", parameters={"stop": [stop]})
    stopped = client.chat("stopper", messages=QUESTION, options={**GREEDY, "num_predict": 40}).message.content
    assert stopped == plain[:plain.index(stop)] and stop not in stopped


def test_the_system_prompt_and_history_reach_the_model(client: ollama.Client) -> None:
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}]
    client.create("remembers", from_="smollm2", system=SYSTEM, messages=history)
    # the model's own prompt is what the base reads with that system prompt and history sent explicitly
    as_sent = _prompt_tokens(client, "smollm2", [{"role": "system", "content": SYSTEM}, *history, *QUESTION])
    assert _prompt_tokens(client, "remembers", QUESTION) == as_sent
    assert _prompt_tokens(client, "smollm2", QUESTION) != as_sent
    # a request's own system prompt replaces the model's; the history stays
    own = [{"role": "system", "content": "Be brief."}]
    assert _prompt_tokens(client, "remembers", [*own, *QUESTION]) == _prompt_tokens(
        client, "smollm2", [*own, *history, *QUESTION])
    generated = client.generate("remembers", prompt=QUESTION[0]["content"], options={**GREEDY, "num_predict": 1})
    assert generated.prompt_eval_count == as_sent  # /api/generate: the same system prompt and history


def test_deleting_the_base_keeps_the_derived_model_working(client: ollama.Client, daemon: Daemon,
                                                            gguf_path: Path) -> None:
    assert daemon.cli("create", "short-lived", "--from", str(gguf_path)).returncode == 0
    client.create("survivor", from_="short-lived", system="Answer in French.")
    client.delete("short-lived")
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("short-lived")
    assert missing.value.status_code == 404
    assert client.chat("survivor", messages=QUESTION, options={**GREEDY, "num_predict": 4}).eval_count == 4
    assert _show(daemon, "survivor")["system"] == "Answer in French."


def test_a_modelfile_through_the_cli(client: ollama.Client, daemon: Daemon, gguf_path: Path,
                                     tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "smol.gguf").symlink_to(gguf_path)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(
        "# a model made from a file beside this Modelfile\n"
        "from ./weights/smol.gguf\n"
        "PARAMETER num_predict 4\n"
        "PARAMETER temperature 0\n"  # greedy: a sampled answer could end before its 4 tokens
        "PARAMETER stop \"<|im_end|>\"\n"
        'SYSTEM """You answer questions about geography.\nKeep it short."""\n'
        "MESSAGE user Where is Rome?\n"
        "MESSAGE assistant In Italy.\n"
        "LICENSE Apache-2.0\n")
    made = daemon.cli("create", "geo", "-f", str(modelfile))
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().splitlines()[-1] == "success"
    assert daemon.cli("show", "geo", "--system").stdout == "You answer questions about geography.\nKeep it short.\n"
    parameters = daemon.cli("show", "geo", "--parameters").stdout
    assert f"{'num_predict':<30} 4" in parameters and f"{'stop':<30} \"<|im_end|>\"" in parameters
    assert daemon.cli("show", "geo", "--license").stdout == "Apache-2.0\n"
    shown = daemon.cli("show", "geo", "--modelfile").stdout
    assert "MESSAGE user Where is Rome?\nMESSAGE assistant In Italy.\n" in shown
    assert "System" in daemon.cli("show", "geo").stdout  # the summary has the system prompt's section
    assert client.chat("geo", messages=QUESTION).eval_count == 4
    # FROM a model in the store; a relative FROM that is not there, or a bad line, fails before any upload
    (tmp_path / "Derived").write_text("FROM geo\nPARAMETER num_predict 2\n")
    assert daemon.cli("create", "geo2", "-f", str(tmp_path / "Derived")).returncode == 0
    assert _show(daemon, "geo2")["system"] == "You answer questions about geography.\nKeep it short."
    assert _show(daemon, "geo2")["messages"] == [{"role": "user", "content": "Where is Rome?"},
                                                 {"role": "assistant", "content": "In Italy."}]
    assert client.chat("geo2", messages=QUESTION).eval_count == 2
    (tmp_path / "Bad").write_text("FROM geo\nPARAMETER num_predict lots\n")
    failed = daemon.cli("create", "bad", "-f", str(tmp_path / "Bad"))
    assert failed.returncode == 1
    assert failed.stderr.strip() == (f"Error: {tmp_path / 'Bad'}, line 2: invalid int value 'lots' for parameter "
                                     "'num_predict'")
    (tmp_path / "Missing").write_text("FROM ./nowhere.gguf\n")
    failed = daemon.cli("create", "bad", "-f", str(tmp_path / "Missing"))
    assert failed.returncode == 1 and "nowhere.gguf does not exist" in failed.stderr


def test_a_template_replaces_the_models_chat_template(client: ollama.Client) -> None:
    """The template renders the last message alone, no special tokens: the prompt the runner reads is the
    text itself, so the answer is the raw completion of that text on the base."""
    client.create("bare", from_="smollm2", template="{{ messages[-1]['content'] }}")
    text = "The capital of France is"
    chat = client.chat("bare", messages=[{"role": "user", "content": text}], options={**GREEDY, "num_predict": 6})
    raw = client.generate("smollm2", prompt=text, raw=True, options={**GREEDY, "num_predict": 6})
    assert chat.prompt_eval_count == raw.prompt_eval_count
    assert chat.message.content == raw.response
    templated = client.chat("smollm2", messages=[{"role": "user", "content": text}],
                            options={**GREEDY, "num_predict": 1})
    assert templated.prompt_eval_count != chat.prompt_eval_count
    assert client.show("bare").template == "{{ messages[-1]['content'] }}"


@pytest.mark.parametrize("template", ["{{ .System }} USER: {{ .Prompt }}", "{{- range .Messages }}{{ end }}",
                                      "{{ if .System }}x{{ end }}"])
def test_a_go_template_is_a_400_that_says_so(client: ollama.Client, template: str) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.create("go", from_="smollm2", template=template)
    assert refused.value.status_code == 400 and "Go template" in str(refused.value.error)
    assert "Jinja" in str(refused.value.error)


def test_bad_create_requests_are_400s_and_a_missing_base_a_404(client: ollama.Client, daemon: Daemon) -> None:
    for body, words in (({"model": "x", "from": "smollm2", "parameters": {"colour": "red"}}, "unknown parameter"),
                        ({"model": "x", "from": "smollm2", "parameters": {"num_ctx": "big"}}, "invalid int value"),
                        ({"model": "x"}, "neither 'from' or 'files' was specified"),
                        ({"model": "x", "from": "smollm2", "files": {"a.gguf": "sha256:" + "0" * 64}}, "not both"),
                        ({"model": "x", "from": "smollm2", "messages": [{"role": "robot", "content": "hi"}]},
                         "messages[0]"),
                        ({"model": "x", "from": "smollm2", "template": "{% for m in messages %}"}, "template error"),
                        ({"model": "x", "from": "smollm2", "adapters": {"a.gguf": "sha256:" + "0" * 64}},
                         "no blob for a.gguf")):
        answer = httpx.post(daemon.base_url + "/api/create", json={**body, "stream": False})
        assert answer.status_code == 400 and words in answer.json()["error"], (body, answer.text)
    with pytest.raises(ollama.ResponseError) as missing:
        client.create("x", from_="no-such-model")
    assert missing.value.status_code == 404
    assert "x:latest" not in [m.model for m in client.list().models]


def test_keep_alive_forever_shows_a_far_future_expiry(client: ollama.Client) -> None:
    client.generate("smollm2", prompt="", keep_alive=-1)
    entry = next(m for m in client.ps().models if m.model == "smollm2:latest")
    assert entry.expires_at is not None and entry.expires_at.year >= 2300  # as Ollama: 2318
    client.generate("smollm2", prompt="", keep_alive="5m")
    entry = next(m for m in client.ps().models if m.model == "smollm2:latest")
    assert entry.expires_at is not None
    assert entry.expires_at - dt.datetime.now(dt.UTC) < dt.timedelta(minutes=6)


def test_the_version_is_one_that_version_gated_clients_accept(daemon: Daemon) -> None:
    answer = httpx.get(daemon.base_url + "/api/version").json()
    assert tuple(int(n) for n in answer["version"].split(".")) >= (0, 6, 4)  # VS Code Copilot Chat's minimum
    printed = daemon.cli("--version").stdout.strip()
    assert printed == f"mgr version {answer['mgr_version']}" and answer["mgr_version"] != answer["version"]
