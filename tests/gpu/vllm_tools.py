"""Tool calling and reasoning through mgr with the real vLLM on a real GPU (issue 11, items 3 and 4). Runs on the GPU
machine after ../shared/gpu/unpack.sh and `source tests/gpu/env.sh`, not in CI:

    python3 tests/gpu/vllm_tools.py /tmp/smollm2-st          (MGR_GPU_OUT=<file> also writes the transcript as JSON)

SmolLM2-135M-Instruct's own template has no tool syntax, so the script makes three models of its weights:
- smol-st     its own template: no family, so mgr starts it with hermes (forced calls only) and no reasoning parser;
- smol-tools  a Hermes-style template (Qwen2.5's shape, <tool_call>): mgr's table picks hermes from it;
- smol-think  a template whose prompt opens <think>, and a tokenizer in which two unused special tokens
              (<jupyter_text>, <jupyter_code>) are renamed <think> and </think> (vLLM's deepseek_r1 parser needs them
              as tokens): the table picks deepseek_r1; config.toml turns its tool parser off (tool_call_parser = "").
Few-shot turns make even a 135M model write `<tool_call>{...}</tool_call>` at temperature 0. It never writes the
renamed </think> token itself (it ends its turn instead), so the reasoning requests ask vLLM to close the reasoning
after 10 tokens (`thinking_token_budget`, which vLLM 0.25 supports only with VLLM_USE_V2_MODEL_RUNNER=0, set here for
the runners) and to write at least 24 tokens (`min_tokens`): the split itself is then vLLM's deepseek_r1 parser's.

Checks, each printed as PASS/FAIL with what was measured, all run even after a failure (exit 1 if any failed):
the runners' command lines; auto -> a parsed call (finish_reason tool_calls), streamed too; required and a named
function -> a call matching the tool's JSON schema (vLLM's guided decoding), also on smol-st whose template has no
tool syntax; without a parser vLLM refuses `required` (why every model gets one); the tool-result round trip;
the reasoning split into `reasoning` (vLLM 0.25's name), streamed too; plain chat still answers. The Ollama API's
translation (/api/chat tools and think) is printed as INFO (that code is another item's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from gpu_checks import ROOT, URL, _up, env, mgr, runners, say

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a time zone",
        "parameters": {"type": "object", "properties": {
            "timezone": {"type": "string"}, "hour24": {"type": "boolean"}},
            "required": ["timezone", "hour24"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# Qwen2.5's template, cut down: tools in the system prompt, calls as <tool_call>{json}</tool_call>, results as
# <tool_response> in a user turn.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for call in message.tool_calls %}
{%- set arguments = call.function.arguments %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ arguments if arguments is string else arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

THINK_TEMPLATE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""
THINK_TOKENS = {"<jupyter_text>": "<think>", "<jupyter_code>": "</think>"}


def call_text(city: str) -> str:
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'


TOOL_SHOTS: list[dict[str, Any]] = [m for city in ("London", "Tokyo", "Madrid") for m in (
    {"role": "user", "content": f"What is the weather in {city}?"}, {"role": "assistant", "content": call_text(city)})]
THINK_SHOTS: list[dict[str, Any]] = [m for country, capital in (("France", "Paris"), ("Italy", "Rome"),
                                                                ("Spain", "Madrid")) for m in (
    {"role": "user", "content": f"What is the capital of {country}?"},
    {"role": "assistant", "content": f"<think>\nThe user asks for a capital. I know it.\n</think>\n\n"
                                     f"The capital of {country} is {capital}."})]

results: list[dict[str, Any]] = []


def record(kind: str, ok: bool | None, what: str, **data: Any) -> bool:
    label = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    say(f"{label} {what}")
    for key, value in data.items():
        say(f"     {key}: {json.dumps(value)[:700]}")
    results.append({"check": what, "result": label, "kind": kind, **data})
    return bool(ok)


def make_models(folder: Path) -> dict[str, Path]:
    base = ROOT / "src"
    tools, think = base / "smol-tools", base / "smol-think"
    for target in (tools, think):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        (target / "chat_template.jinja").unlink(missing_ok=True)
    set_template(tools, HERMES_TEMPLATE)
    set_template(think, THINK_TEMPLATE)
    rename_tokens(think, THINK_TOKENS)
    return {"smol-st": folder, "smol-tools": tools, "smol-think": think}


def set_template(folder: Path, template: str) -> None:
    (folder / "chat_template.jinja").write_text(template)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=1))


def rename_tokens(folder: Path, renames: dict[str, str]) -> None:
    """Rename special tokens (same ids, so the same embeddings) and make them ordinary added tokens, so that
    detokenizing keeps them in the text, as Qwen3's and DeepSeek's tokenizers keep <think>."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for token in tokenizer.get("added_tokens", []):
        if token["content"] in renames:
            token["content"], token["special"] = renames[token["content"]], False
    vocab = tokenizer["model"]["vocab"]
    for old, new in renames.items():
        if old in vocab:
            vocab[new] = vocab.pop(old)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        for token in (config.get("added_tokens_decoder") or {}).values():
            if token.get("content") in renames:
                token["content"], token["special"] = renames[token["content"]], False
        if isinstance(config.get("additional_special_tokens"), list):
            config["additional_special_tokens"] = [t for t in config["additional_special_tokens"]
                                                   if (t if isinstance(t, str) else t.get("content")) not in renames]
        path.write_text(json.dumps(config, indent=1))


def chat(model: str, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    return httpx.post(URL + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 80, **extra})


def stream_chat(model: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The deltas of a streamed answer put together: content, reasoning, tool calls by index, finish_reason."""
    joined: dict[str, Any] = {"content": "", "reasoning": "", "tool_calls": {}, "finish_reason": None, "chunks": 0}
    with httpx.stream("POST", URL + "/v1/chat/completions", timeout=300, json={
            "model": model, "messages": messages, "temperature": 0, "max_tokens": 80, "stream": True,
            **extra}) as response:
        joined["status"] = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            joined["chunks"] += 1
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                joined["content"] += delta.get("content") or ""
                joined["reasoning"] += delta.get("reasoning") or delta.get("reasoning_content") or ""
                for call in delta.get("tool_calls") or []:
                    slot = joined["tool_calls"].setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                    function = call.get("function") or {}
                    slot["name"] += function.get("name") or ""
                    slot["arguments"] += function.get("arguments") or ""
                joined["finish_reason"] = choice.get("finish_reason") or joined["finish_reason"]
    return joined


def schema_errors(name: str, arguments: str) -> list[str]:
    """What is wrong with a call's arguments against its tool's JSON schema ([] when they match)."""
    if name not in SCHEMAS:
        return [f"unknown tool {name!r}"]
    try:
        value = json.loads(arguments)
    except ValueError as e:
        return [f"arguments are not JSON: {e}"]
    try:
        import jsonschema
    except ImportError:
        schema = SCHEMAS[name]
        missing = [k for k in schema["required"] if k not in value]
        return [f"missing {missing}"] if missing else []
    return [e.message for e in jsonschema.Draft202012Validator(SCHEMAS[name]).iter_errors(value)]


def first_call(answer: dict[str, Any]) -> tuple[str, str]:
    calls = answer["choices"][0]["message"].get("tool_calls") or []
    return (calls[0]["function"]["name"], calls[0]["function"]["arguments"]) if calls else ("", "")


def check_runner_flags(daemon: subprocess.Popen[bytes]) -> None:
    flags: dict[str, list[str]] = {}
    for process in runners(daemon):
        argv = process.cmdline()
        name = argv[argv.index("--served-model-name") + 1]
        flags[name] = [a for i, a in enumerate(argv) if a in ("--enable-auto-tool-choice", "--tool-call-parser",
                                                               "--reasoning-parser")
                       or argv[i - 1] in ("--tool-call-parser", "--reasoning-parser")]
    expected = {
        "smol-st:latest": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        "smol-tools:latest": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        "smol-think:latest": ["--reasoning-parser", "deepseek_r1"],
    }
    record("argv", flags == expected, "runner command lines carry the parsers mgr picked", flags=flags)


def check_tools() -> None:
    question = {"role": "user", "content": "What is the weather in Berlin?"}
    response = chat("smol-tools", [*TOOL_SHOTS, question], tools=TOOLS, tool_choice="auto")
    answer = response.json()
    choice = answer.get("choices", [{}])[0]
    name, arguments = first_call(answer) if response.status_code == 200 else ("", "")
    record("auto", response.status_code == 200 and choice.get("finish_reason") == "tool_calls"
           and name == "get_weather" and not schema_errors(name, arguments),
           "auto: a Hermes-style <tool_call> comes back parsed as tool_calls (finish_reason tool_calls)",
           status=response.status_code, message=choice.get("message"), finish_reason=choice.get("finish_reason"))
    streamed = stream_chat("smol-tools", [*TOOL_SHOTS, question], tools=TOOLS, tool_choice="auto")
    call = streamed["tool_calls"].get(0, {"name": "", "arguments": ""})
    record("auto-stream", streamed["finish_reason"] == "tool_calls" and call["name"] == "get_weather"
           and not schema_errors(call["name"], call["arguments"]) and "<tool_call>" not in streamed["content"],
           "auto, streamed: tool_calls deltas put together parse", joined=streamed)

    plain = [{"role": "user", "content": "Hello! Tell me something nice."}]
    for model in ("smol-tools", "smol-st"):
        response = chat(model, plain, tools=TOOLS, tool_choice="required")
        answer = response.json()
        name, arguments = first_call(answer) if response.status_code == 200 else ("", "")
        errors = schema_errors(name, arguments) if name else ["no tool call"]
        record("required", response.status_code == 200 and not errors,
               f"required on {model}: a call that matches its tool's schema (guided decoding)",
               status=response.status_code, message=answer.get("choices", [{}])[0].get("message", answer),
               finish_reason=answer.get("choices", [{}])[0].get("finish_reason"), schema_errors=errors)
        named = {"type": "function", "function": {"name": "get_time"}}
        response = chat(model, plain, tools=TOOLS, tool_choice=named)
        answer = response.json()
        name, arguments = first_call(answer) if response.status_code == 200 else ("", "")
        errors = schema_errors(name, arguments) if name else ["no tool call"]
        record("named", response.status_code == 200 and name == "get_time" and not errors,
               f"named get_time on {model}: that function, arguments matching its schema",
               status=response.status_code, message=answer.get("choices", [{}])[0].get("message", answer),
               finish_reason=answer.get("choices", [{}])[0].get("finish_reason"), schema_errors=errors)
    streamed = stream_chat("smol-st", plain, tools=TOOLS, tool_choice="required")
    call = streamed["tool_calls"].get(0, {"name": "", "arguments": ""})
    record("required-stream", bool(call["name"]) and not schema_errors(call["name"], call["arguments"]),
           "required on smol-st, streamed: the call's deltas put together match the schema", joined=streamed)

    # smol-think runs without a tool parser (config.toml: tool_call_parser = ""): vLLM refuses forced calls
    response = chat("smol-think", plain, tools=TOOLS, tool_choice="required")
    record("no-parser", response.status_code == 400, "without --tool-call-parser vLLM 0.25 refuses required",
           status=response.status_code, body=response.text[:400])

    # the round trip: the call and its result rendered back through the template
    history = [*TOOL_SHOTS, question, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 12, "sky": "cloudy"}'}]
    response = chat("smol-tools", history, tools=TOOLS)
    answer = response.json()
    record("round-trip", response.status_code == 200, "a tool result goes back through the template",
           status=response.status_code, message=answer.get("choices", [{}])[0].get("message", answer))

    response = chat("smol-tools", [*TOOL_SHOTS, question], tools=TOOLS, tool_choice="none")
    answer = response.json()
    message = answer.get("choices", [{}])[0].get("message", answer)
    record("none", response.status_code == 200 and not message.get("tool_calls"), "tool_choice none: no tool_calls",
           status=response.status_code, message=message)

    # INFO: the Ollama API's translation (the Ollama adapter is another item's code)
    response = httpx.post(URL + "/api/chat", timeout=300, json={
        "model": "smol-tools", "stream": False, "messages": [*TOOL_SHOTS, question], "tools": TOOLS,
        "options": {"temperature": 0, "num_predict": 80}})
    record("ollama-tools", None, "Ollama /api/chat with tools on smol-tools", status=response.status_code,
           body=response.json() if response.status_code == 200 else response.text[:400])
    response = chat("smol-st", [*TOOL_SHOTS, question], tools=TOOLS, tool_choice="auto")
    record("capability", None, "auto on smol-st (its template renders no tools)", status=response.status_code,
           body=response.text[:300])


def check_reasoning() -> None:
    question = {"role": "user", "content": "What is the capital of Germany?"}
    # SmolLM2 never learnt to write the renamed token, so vLLM's own thinking_token_budget closes the reasoning (it
    # forces </think> after that many reasoning tokens) and min_tokens keeps the turn going to an answer after it.
    budget = {"thinking_token_budget": 10, "min_tokens": 24}
    response = chat("smol-think", [*THINK_SHOTS, question], **budget)
    answer = response.json()
    message = answer.get("choices", [{}])[0].get("message", {})
    reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
    content = message.get("content") or ""
    record("reasoning", response.status_code == 200 and bool(reasoning.strip()) and bool(content.strip())
           and "</think>" not in content and "</think>" not in reasoning,
           "the reasoning comes back split from the answer (--reasoning-parser deepseek_r1)",
           status=response.status_code, message=message, fields=sorted(message))
    streamed = stream_chat("smol-think", [*THINK_SHOTS, question], **budget)
    record("reasoning-stream", bool(streamed["reasoning"].strip()) and bool(streamed["content"].strip())
           and "</think>" not in streamed["content"], "streamed: reasoning deltas, then content deltas",
           joined=streamed)
    response = httpx.post(URL + "/api/chat", timeout=300, json={
        "model": "smol-think", "stream": False, "think": True, "messages": [*THINK_SHOTS, question],
        "options": {"temperature": 0, "num_predict": 80}})
    record("ollama-think", None, "Ollama /api/chat think=true on smol-think", status=response.status_code,
           body=response.json() if response.status_code == 200 else response.text[:400])
    response = chat("smol-st", [{"role": "user", "content": "What is the capital of France? One sentence."}])
    text = (response.json().get("choices", [{}])[0].get("message") or {}).get("content") or ""
    record("plain", response.status_code == 200 and "Paris" in text,
           "plain chat on smol-st still answers with its (forced-call) hermes parser on", content=text)


def main(folder: str) -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # for thinking_token_budget (the runners inherit it)
    models = make_models(Path(folder))
    (ROOT / "config.toml").write_text(
        '[models."smol-st:latest"]\nvllm_args = ["--enforce-eager"]\n'
        '[models."smol-tools:latest"]\nvllm_args = ["--enforce-eager"]\n'
        '[models."smol-think:latest"]\nvllm_args = ["--enforce-eager"]\ntool_call_parser = ""\n')
    log = (ROOT / "daemon.log").open("ab")
    # MGR_GPU_DAEMON: another command that serves mgr (a dry run of this script against the stand-in vLLM, say)
    command = os.environ.get("MGR_GPU_DAEMON", f"{sys.executable} -m mgr.cli serve").split()
    daemon = subprocess.Popen(command, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
    try:
        started = time.monotonic()
        while not _up():
            if time.monotonic() - started > 60:
                raise SystemExit("FAIL the daemon did not answer within 60 s")
            time.sleep(0.2)
        for name, path in models.items():
            created = mgr("create", name, "--from", str(path))
            record("create", created.returncode == 0, f"mgr create {name}", stderr=created.stderr.strip()[-300:])
        shown = {name: httpx.post(URL + "/api/show", json={"model": name}).json().get("capabilities")
                 for name in models}
        record("show", None, "/api/show capabilities (registry/capabilities.py)", capabilities=shown)
        loads: dict[str, Any] = {}

        def load(name: str) -> None:  # the three cold starts at once
            began = time.monotonic()
            response = httpx.post(URL + "/api/generate", json={"model": name}, timeout=600)
            loads[name] = {"status": response.status_code, "seconds": round(time.monotonic() - began, 1)}

        threads = [threading.Thread(target=load, args=(name,)) for name in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        record("load", all(v["status"] == 200 for v in loads.values()), "three vLLM runners loaded", loads=loads)
        check_runner_flags(daemon)
        for group in (check_tools, check_reasoning):
            try:
                group()
            except Exception as e:  # one broken group must not hide the other's results
                record(group.__name__, False, f"{group.__name__} raised {type(e).__name__}: {e}")
    finally:
        for log_file in (ROOT / "state" / "runners").glob("*.log"):
            say(f"----- {log_file.name} (lines that name parsers, errors, the last lines)")
            lines = log_file.read_text(errors="replace").splitlines()
            picked = [line for line in lines if any(w in line for w in ("parser", "tool", "Error", "error"))]
            say("\n".join(picked[-15:] + ["..."] + lines[-8:]))
        daemon.terminate()
        daemon.wait(timeout=60)
        if os.environ.get("MGR_GPU_OUT"):
            Path(os.environ["MGR_GPU_OUT"]).write_text(json.dumps(results, indent=1))
    failed = [r["check"] for r in results if r["result"] == "FAIL"]
    say(f"{len(results) - len(failed)} of {len(results)} checks did not fail; failed: {failed}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2-st")
