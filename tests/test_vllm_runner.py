"""The vLLM runner without a GPU: its exact command lines for given placements and versions, and its whole
lifecycle through the real daemon (HTTP over loopback, imaginary GPU) against a STAND-IN vLLM server
(tests/standin/fake_vllm: a `vllm` package whose OpenAI server accepts vLLM's command line and serves the
stand-in runner, sleep endpoints included); the table from a model to vLLM's tool-call and reasoning parsers, on
excerpts of real chat templates. The real vLLM is verified on the GPU machine (tests/gpu/)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import psutil
import pytest
import uvicorn
from conftest import wait_for
from fakehub import import_file
from standin.gpus import StaticGpus
from standin.models import write_tiny_safetensors_model

from mgr.daemon.app import create_app
from mgr.daemon.errors import EngineUnavailable
from mgr.daemon.placement import Placement
from mgr.daemon.runners.base import LoadSpec
from mgr.daemon.runners.vllm import vllm_argv, vllm_version
from mgr.registry.config import ConfigError, ModelOverrides, Settings, load_settings
from mgr.registry.vllm_parsers import (
    NEEDS_TOKENS,
    REASONING_PARSERS,
    TOKENS_OF_INTEREST,
    TOOL_CALL_PARSERS,
    VllmParsers,
    pick_parsers,
    vllm_parsers,
)

FAKE_VLLM = Path(__file__).parent / "standin" / "fake_vllm"
GIB = 1 << 30
SPEC = LoadSpec(name="smol:latest", digest="d" * 64, format="safetensors", model_path=Path("/m/links/abc"),
                num_ctx=2048, num_parallel=256, size=270_000_000)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_command_line_for_one_gpu() -> None:
    argv = vllm_argv(SPEC, Placement((0,), memory_fraction=0.075), 40001, "/py", (0, 25, 0))
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "/m/links/abc" and flag(argv, "--served-model-name") == "smol:latest"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "40001"
    assert flag(argv, "--gpu-memory-utilization") == "0.075"
    assert flag(argv, "--max-model-len") == "2048" and flag(argv, "--max-num-seqs") == "256"
    assert flag(argv, "--tensor-parallel-size") == "1" and "--enable-sleep-mode" in argv
    assert "--disable-log-requests" not in argv and "--distributed-executor-backend" not in argv


def test_command_line_for_tensor_parallel_ray_old_versions_and_extra_args() -> None:
    tp = vllm_argv(SPEC, Placement((2, 3, 4, 5), memory_fraction=0.5), 1, "/py", (0, 25, 0))
    assert flag(tp, "--tensor-parallel-size") == "4"
    ray = vllm_argv(SPEC, Placement(tuple(range(16)), 0.9, pipeline_parallel=2), 1, "/py", (0, 25, 0),
                    ray_address="ray://head:10001")
    assert flag(ray, "--distributed-executor-backend") == "ray"
    assert flag(ray, "--pipeline-parallel-size") == "2" and flag(ray, "--tensor-parallel-size") == "8"
    old = vllm_argv(SPEC, Placement((0,), 0.3), 1, "/py", (0, 9, 2), extra_args=("--enforce-eager",))
    assert "--disable-log-requests" in old and old[-1] == "--enforce-eager"
    # a request's own chat template (Ollama's per-request `template`) needs vLLM's trust from 0.11 on
    assert "--trust-request-chat-template" in tp and "--trust-request-chat-template" not in old


# Excerpts of real chat templates: the lines that tell a family apart.
QWEN25 = ('{%- if tools %}{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query." }}'
          '{{- "For each function call, return a json object with function name and arguments within '
          '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
          '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}{%- endif %}'
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3 = (QWEN25.removesuffix("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}") +
         "{%- if '</think>' in content %}{%- set reasoning_content = content.split('</think>')[0] %}{%- endif %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
         "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
         "{%- endif %}{%- endif %}")
QWEN3_INSTRUCT_2507 = QWEN3.replace("{%- if enable_thinking is defined and enable_thinking is false %}"
                                    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}", "")
QWEN3_THINKING_2507 = QWEN3_INSTRUCT_2507.replace("{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                                                  "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
QWEN3_CODER = ("{%- if tools %}If you choose to call a function ONLY reply in the following format:\\n<tool_call>\\n"
               "<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>"
               "{%- endif %}")
QWQ = QWEN25.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
LLAMA31 = ('{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}<|start_header_id|>'
           "{{- '<|python_tag|>' + tool_call.name + '.call(' }}")
LLAMA4 = ("{%- if tools is not none %}Given the following functions, please respond with a JSON for a function call"
          "{%- endif %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}")
MISTRAL = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}{{- '[TOOL_CALLS][' }}"
MAGISTRAL = MISTRAL + "[THINK]Here, your thinking process[/THINK]"
R1_DISTILL = ("{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
              "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' }}"
              "{% set content = content.split('</think>')[-1] %}"
              "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
DEEPSEEK_V31 = ("{%- if tools %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ tool['function']['name'] + "
                "'<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}{%- endif %}"
                "{%- if thinking %}{{'<｜Assistant｜><think>'}}{%- else %}{{'<｜Assistant｜></think>'}}{%- endif %}")
KIMI_K2_THINKING = "{%- if tools -%}<|tool_calls_section_begin|>{%- endif -%}<think></think>"
GRANITE31 = "{%- if tools %}<|start_of_role|>available_tools<|end_of_role|>{%- endif %}<|tool_call|>"
GRANITE32 = GRANITE31 + ("{%- if thinking %}You are a helpful AI assistant. Respond to every user query in a "
                         "comprehensive and detailed way. You can write down your thought process before responding. "
                         "Write your thoughts after 'Here is my thought process:'{%- endif %}")
GRANITE4 = "{%- if tools %}<tools>{{ tools | tojson }}</tools>{%- endif %}<tool_call>"
SMOLLM2 = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>' + '\\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
THINK = {"<think>", "</think>"}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def config(architecture: str, model_type: str) -> dict[str, object]:
    return {"architectures": [architecture], "model_type": model_type}


@pytest.mark.parametrize(("model", "template", "tokens", "tool", "reasoning"), [
    (config("Qwen2ForCausalLM", "qwen2"), QWEN25, set(), "hermes", None),
    (config("Qwen3ForCausalLM", "qwen3"), QWEN3, THINK, "hermes", "qwen3"),
    (config("Qwen3MoeForCausalLM", "qwen3_moe"), QWEN3_INSTRUCT_2507, THINK, "hermes", None),
    (config("Qwen3MoeForCausalLM", "qwen3_moe"), QWEN3_THINKING_2507, THINK, "hermes", "qwen3"),
    (config("Qwen3MoeForCausalLM", "qwen3_moe"), QWEN3_CODER, set(), "qwen3_coder", None),
    (config("Qwen2ForCausalLM", "qwen2"), QWQ, THINK, "hermes", "deepseek_r1"),
    (config("Qwen2ForCausalLM", "qwen2"), R1_DISTILL, THINK | {"<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"},
     "deepseek_v3", "deepseek_r1"),
    (config("DeepseekV3ForCausalLM", "deepseek_v3"), DEEPSEEK_V31, None, "deepseek_v31", "deepseek_v3"),
    (config("DeepseekV3ForCausalLM", "kimi_k2"), KIMI_K2_THINKING, None, "kimi_k2", "kimi_k2"),
    (LLAMA, LLAMA31, {"<|python_tag|>"}, "llama3_json", None),
    (config("Llama4ForConditionalGeneration", "llama4"), LLAMA4, {"<|python_tag|>"}, "llama4_json", None),
    (config("MistralForCausalLM", "mistral"), MISTRAL, {"[TOOL_CALLS]"}, "mistral", None),
    (config("MistralForCausalLM", "mistral"), MAGISTRAL, {"[TOOL_CALLS]"}, "mistral", "mistral"),
    (config("GraniteForCausalLM", "granite"), GRANITE31, set(), "granite", None),
    (config("GraniteForCausalLM", "granite"), GRANITE32, set(), "granite", "granite"),
    (config("GraniteForCausalLM", "granite"), GRANITE4, set(), "granite4", None),
    (config("GraniteMoeHybridForCausalLM", "granitemoehybrid"), GRANITE4, set(), "granite4", None),
    (config("GptOssForCausalLM", "gpt_oss"), "<|start|>assistant<|channel|>analysis", None, "openai",
     "openai_gptoss"),
    (config("Glm4MoeForCausalLM", "glm4_moe"), "<tool_call>{{ tc.name }}<arg_key>k</arg_key><think>", None, "glm45",
     "glm45"),
])
def test_the_parser_table_on_real_template_excerpts(model: dict[str, object], template: str, tokens: set[str] | None,
                                                    tool: str, reasoning: str | None) -> None:
    found = pick_parsers(model, template, tokens)
    assert (found.tool_call_parser, found.reasoning_parser) == (tool, reasoning)
    assert found.tool_family and found.tools and found.thinking == (reasoning is not None)


def test_a_model_of_no_known_family_gets_hermes_for_forced_calls_only() -> None:
    """vLLM 0.25 answers tool_choice "required" or named with 400 unless a tool parser is set: every model gets
    one, hermes where no family matched (a structural tag then forces <tool_call>{...}</tool_call>)."""
    found = pick_parsers(LLAMA, SMOLLM2, set())
    assert found == VllmParsers(tool_call_parser="hermes", reasoning_parser=None, tool_family=False,
                                template_tools=False)
    assert not found.tools and not found.thinking
    # a template that renders tools in a syntax no parser knows: tools (forced calls), auto answers in prose
    custom = pick_parsers(LLAMA, "{% if tools %}FUNCTIONS: {{ tools }}{% endif %}", set())
    assert custom.tool_call_parser == "hermes" and not custom.tool_family and custom.tools


def test_parsers_need_their_tokens_in_the_tokenizer() -> None:
    """vLLM refuses a tokenizer without <think> for deepseek_r1, without <|python_tag|> for llama3_json, ..."""
    assert pick_parsers(config("Qwen2ForCausalLM", "qwen2"), QWQ, set()).reasoning_parser is None
    assert pick_parsers(config("Qwen2ForCausalLM", "qwen2"), QWQ, None).reasoning_parser == "deepseek_r1"  # unknown
    llama = pick_parsers(LLAMA, LLAMA31, set())
    assert llama.tool_call_parser == "hermes" and not llama.tool_family and llama.tools
    distill = pick_parsers(config("Qwen2ForCausalLM", "qwen2"), R1_DISTILL, THINK)  # no DeepSeek tool tokens
    assert (distill.tool_call_parser, distill.tool_family, distill.reasoning_parser) == ("hermes", False, "deepseek_r1")


def test_the_table_names_only_parsers_vllm_registers() -> None:
    """Every name the table can give is one vLLM 0.25 registers (the stand-in's copy of its lists)."""
    spec = importlib.util.spec_from_file_location("registered", FAKE_VLLM / "vllm" / "registered_parsers.py")
    assert spec is not None and spec.loader is not None
    registered = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(registered)
    assert set(registered.TOOL_PARSERS) == TOOL_CALL_PARSERS
    assert set(registered.REASONING_PARSERS) == REASONING_PARSERS
    from mgr.registry import vllm_parsers as table

    named = {p for _, p in table._TOOL_MARKERS} | {t for t, _ in table._BY_ARCHITECTURE.values() if t}
    assert named <= TOOL_CALL_PARSERS and table.FORCED_CALL_PARSER in TOOL_CALL_PARSERS
    assert {r for _, r in table._BY_ARCHITECTURE.values() if r} <= REASONING_PARSERS
    assert set(NEEDS_TOKENS) <= TOOL_CALL_PARSERS | REASONING_PARSERS and "<think>" in TOKENS_OF_INTEREST


def test_parsers_read_from_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config("Qwen3ForCausalLM", "qwen3")))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": QWEN3, "added_tokens_decoder": {"151667": {"content": "<think>", "special": False},
                                                         "151668": {"content": "</think>", "special": False}}}))
    assert vllm_parsers(tmp_path) == VllmParsers("hermes", "qwen3", tool_family=True, template_tools=True)
    # the per-model settings: "" = none, a name = that parser, None = the table's
    assert vllm_parsers(tmp_path, tool_call_parser="", reasoning_parser="deepseek_r1") == VllmParsers(
        None, "deepseek_r1", tool_family=False, template_tools=True)
    assert vllm_parsers(tmp_path, reasoning_parser="").thinking is False
    # a tokenizer.json without the think tokens: no reasoning parser (vLLM would refuse the requests)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": "<|im_end|>"}],
                                                         "model": {"vocab": {"a": 0}}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN3}))
    assert vllm_parsers(tmp_path).reasoning_parser is None
    # chat_template.jinja (what transformers writes now) and named templates (Hermes 2 Pro's default + tool_use)
    (tmp_path / "chat_template.jinja").write_text(SMOLLM2)
    assert vllm_parsers(tmp_path).tool_family is False
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": SMOLLM2}, {"name": "tool_use", "template": QWEN25}]}))
    assert vllm_parsers(tmp_path).tool_call_parser == "hermes" and vllm_parsers(tmp_path).tool_family
    assert vllm_parsers(tmp_path / "missing") == VllmParsers("hermes")  # no files: forced calls only
    # the files by name, as registry.metadata sees them (blobs not named as the files were)
    blob = tmp_path / "blob-1"
    blob.write_text(QWQ)
    files = {"config.json": tmp_path / "config.json", "chat_template.jinja": blob}
    assert vllm_parsers(files) == VllmParsers("hermes", "qwen3", tool_family=True, template_tools=True)


def test_command_line_with_parsers() -> None:
    parsers = VllmParsers("hermes", "deepseek_r1", tool_family=True)
    argv = vllm_argv(SPEC, Placement((0,), 0.3), 1, "/py", (0, 25, 0), parsers=parsers)
    assert "--enable-auto-tool-choice" in argv and flag(argv, "--tool-call-parser") == "hermes"
    assert flag(argv, "--reasoning-parser") == "deepseek_r1"
    # the model's vllm_args win, flag by flag
    own = vllm_argv(SPEC, Placement((0,), 0.3), 1, "/py", (0, 25, 0), parsers=parsers,
                    extra_args=("--tool-call-parser=pythonic", "--enable-auto-tool-choice"))
    assert "--tool-call-parser" not in own and own.count("--enable-auto-tool-choice") == 1
    assert flag(own, "--reasoning-parser") == "deepseek_r1"
    none = vllm_argv(SPEC, Placement((0,), 0.3), 1, "/py", (0, 25, 0), parsers=VllmParsers(None, None))
    assert not {"--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"} & set(none)


def test_parser_settings_in_config_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[models."qwen3:8b"]\ntool_call_parser = "hermes"\nreasoning_parser = ""\n'
                    '[models."other"]\nnum_ctx = 8192\n')
    settings = load_settings(env={"MGR_CONFIG": str(path)})
    assert settings.for_model("Qwen3:8B") == ModelOverrides(tool_call_parser="hermes", reasoning_parser="")
    assert settings.for_model("other").tool_call_parser is None  # picked from the model
    for bad in ("tool_call_parser = 3", 'reasoning_parser = "qwen3 --evil"', "tool_call_parser = [\"hermes\"]"):
        path.write_text(f'[models."m"]\n{bad}\n')
        with pytest.raises(ConfigError, match="must be a vLLM parser name"):
            load_settings(env={"MGR_CONFIG": str(path)})


def test_missing_vllm_names_the_install_command() -> None:
    vllm_version.cache_clear()
    with pytest.raises(EngineUnavailable, match=r"pip install 'mgr\[vllm\]'"):
        vllm_version(sys.executable)  # this environment has no vLLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real daemon app, in this process on a loopback port, with one imaginary 80 GiB GPU, whose vLLM
    runners come from the stand-in vllm package."""
    root = tmp_path_factory.mktemp("vllm")
    model = write_tiny_safetensors_model(root / "smol-st")
    os.environ["PYTHONPATH"] = f"{FAKE_VLLM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    vllm_version.cache_clear()
    port = _free_port()
    qwenish = write_tiny_safetensors_model(root / "qwenish-st")  # a Qwen3-style template, its reasoning overridden
    (qwenish / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN3, "added_tokens_decoder": {
        "1": {"content": "<think>"}, "2": {"content": "</think>"}}}))
    settings = Settings(host=f"127.0.0.1:{port}", models_dir=root / "models", state_dir=root / "state",
                        num_ctx=2048, models={"smol:latest": ModelOverrides(vllm_args=("--enforce-eager",)),
                                              "qwenish:latest": ModelOverrides(reasoning_parser="deepseek_r1")})
    server = uvicorn.Server(uvicorn.Config(create_app(settings, gpus=StaticGpus([80 * GIB])), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: server.started, timeout=20)
    from mgr.registry.store import Store

    store = Store(root / "models")  # the same store folder the daemon serves
    files = {name: import_file(store, model / name) for name in ("config.json", "model.safetensors")}
    store.create("smol", files, {"type": "test"})
    files = {name: import_file(store, qwenish / name)
             for name in ("config.json", "model.safetensors", "tokenizer_config.json")}
    store.create("qwenish", files, {"type": "test"})
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].removeprefix(f"{FAKE_VLLM}{os.pathsep}")


def runner_process(url: str) -> psutil.Process:
    """The vLLM server process (the stand-in), not the guard (runners/guard.py) that leads its group."""
    children = [p for p in psutil.Process().children(recursive=True)
                if "vllm.entrypoints" in " ".join(p.cmdline()) and "runners.guard" not in " ".join(p.cmdline())]
    assert len(children) == 1, children
    guard = children[0].parent()
    assert guard is not None and "mgr.daemon.runners.guard" in guard.cmdline()
    assert os.getpgid(children[0].pid) == guard.pid  # the guard leads the runner's process group
    return children[0]


def test_the_daemon_starts_vllm_with_its_placement_and_proxies_streams(daemon_url: str) -> None:
    with httpx.stream("POST", daemon_url + "/api/chat", timeout=60, json={
            "model": "smol", "messages": [{"role": "user", "content": "Capital of France?"}]}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line["message"]["content"] for line in lines) == "The capital of France is Paris."
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["load_duration"] > 0
    process = runner_process(daemon_url)
    argv = process.cmdline()
    assert flag(argv, "--tensor-parallel-size") == "1" and flag(argv, "--max-model-len") == "2048"
    assert 0.05 < float(flag(argv, "--gpu-memory-utilization")) < 0.2  # a share of the 80 GiB GPU
    assert argv[-1] == "--enforce-eager"  # the model's extra vLLM arguments from the config
    # no tool syntax in its (absent) template: hermes all the same, for forced calls; no reasoning parser
    assert "--enable-auto-tool-choice" in argv and flag(argv, "--tool-call-parser") == "hermes"
    assert "--reasoning-parser" not in argv
    environ = process.environ()
    assert environ["CUDA_VISIBLE_DEVICES"] == "0" and environ["VLLM_SERVER_DEV_MODE"] == "1"
    sse = httpx.post(daemon_url + "/v1/chat/completions", timeout=60, json={
        "model": "smol", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).text
    assert "Paris" in sse and sse.rstrip().endswith("data: [DONE]")
    ps = httpx.get(daemon_url + "/api/ps").json()["models"]
    assert ps[0]["backend"] == "vllm" and ps[0]["gpus"] == [0] and ps[0]["state"] == "ready"


def test_the_ollama_client_streams_vllm_025_token_events(daemon_url: str) -> None:
    """The real ollama client through /api/chat and /api/generate on the vLLM stand-in, which writes vLLM 0.25's
    chunk layout (token_ids: null and the like): the byte-level fast path renders those tokens, and the
    client reads them as Ollama's own."""
    client = ollama.Client(host=daemon_url)
    parts = list(client.chat(model="smol", messages=[{"role": "user", "content": "Capital of France?"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "The capital of France is Paris."
    assert len(parts) > 2 and parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count
    generated = list(client.generate(model="smol", prompt="Capital of France?", stream=True))
    assert "".join(g.response for g in generated) == "The capital of France is Paris."
    assert generated[-1].done and not any(g.done for g in generated[:-1])


def test_sleep_and_wake_through_the_daemon(daemon_url: str) -> None:
    pid = runner_process(daemon_url).pid
    httpx.post(daemon_url + "/api/generate", timeout=60, json={"model": "smol", "prompt": "hi", "keep_alive": "300ms",
                                                                 "stream": False})
    assert wait_for(lambda: httpx.get(daemon_url + "/api/ps").json()["models"][0]["state"] == "sleeping", timeout=10)
    port = flag(runner_process(daemon_url).cmdline(), "--port")
    assert httpx.get(f"http://127.0.0.1:{port}/is_sleeping").json() == {"is_sleeping": True}
    started = time.monotonic()
    answer = httpx.post(daemon_url + "/api/generate", timeout=60,
                        json={"model": "smol", "prompt": "hi", "stream": False})
    assert answer.status_code == 200 and "Paris" in answer.json()["response"]
    assert time.monotonic() - started < 2.0 and runner_process(daemon_url).pid == pid  # woken, not restarted
    assert httpx.get(f"http://127.0.0.1:{port}/is_sleeping").json() == {"is_sleeping": False}


def test_a_crashed_vllm_runner_is_replaced(daemon_url: str) -> None:
    old = runner_process(daemon_url)
    os.kill(old.pid, signal.SIGKILL)
    assert wait_for(lambda: httpx.get(daemon_url + "/api/ps").json()["models"] == [], timeout=10)
    answer = httpx.post(daemon_url + "/api/generate", timeout=60,
                        json={"model": "smol", "prompt": "hi", "stream": False})
    assert answer.status_code == 200 and runner_process(daemon_url).pid != old.pid


def test_unload_stops_vllm_with_sigterm(daemon_url: str) -> None:
    process = runner_process(daemon_url)
    started = time.monotonic()
    unloaded = httpx.post(daemon_url + "/api/generate", json={"model": "smol", "keep_alive": 0}, timeout=60)
    assert unloaded.json()["done_reason"] == "unload"
    process.wait(timeout=5)  # (the daemon reaps it, so psutil sees no exit code)
    # SIGKILL would come only after a 10 s grace: gone this fast, SIGTERM stopped it
    assert not process.is_running() and time.monotonic() - started < 5
    assert httpx.get(daemon_url + "/api/ps").json()["models"] == []


def test_the_daemon_starts_vllm_with_the_models_parsers_and_its_settings(daemon_url: str) -> None:
    answer = httpx.post(daemon_url + "/api/generate", timeout=60,
                        json={"model": "qwenish", "prompt": "hi", "stream": False})
    assert answer.status_code == 200, answer.text
    argv = runner_process(daemon_url).cmdline()
    assert flag(argv, "--tool-call-parser") == "hermes"  # from its Qwen3-style template
    assert flag(argv, "--reasoning-parser") == "deepseek_r1"  # config.toml's reasoning_parser over the table's qwen3
    # vLLM 0.25 calls the reasoning "reasoning": OpenAI clients get it as reasoning_content, Ollama's as thinking
    sse = httpx.post(daemon_url + "/v1/chat/completions", timeout=60, json={
        "model": "qwenish", "stream": True, "messages": [{"role": "user", "content": "Capital of France?"}]}).text
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in sse.splitlines()
              if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "The user asks for a capital."
    assert not any("reasoning" in d for d in deltas)
    whole = httpx.post(daemon_url + "/v1/chat/completions", timeout=60, json={
        "model": "qwenish", "messages": [{"role": "user", "content": "Capital of France?"}]}).json()
    assert whole["choices"][0]["message"]["reasoning_content"] == "The user asks for a capital."
    chat = httpx.post(daemon_url + "/api/chat", timeout=60, json={
        "model": "qwenish", "stream": False, "think": True,
        "messages": [{"role": "user", "content": "Capital of France?"}]}).json()
    assert chat["message"]["thinking"] == "The user asks for a capital."
    assert chat["message"]["content"] == "The capital of France is Paris."
    show = httpx.post(daemon_url + "/api/show", json={"model": "qwenish"}).json()
    assert show["capabilities"] == ["completion", "tools", "thinking"]
    assert httpx.post(daemon_url + "/api/show", json={"model": "smol"}).json()["capabilities"] == ["completion"]
    assert httpx.post(daemon_url + "/api/generate", json={"model": "qwenish", "keep_alive": 0},
                      timeout=60).json()["done_reason"] == "unload"
