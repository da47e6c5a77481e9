"""Which of vLLM's tool-call and reasoning parsers a safetensors model needs, read from what the model is: its
config.json (`architectures`, `model_type`), its chat template (chat_template.jinja, chat_template.json or
tokenizer_config.json's `chat_template`) and its tokenizer's tokens. The vLLM runner starts the model with

    --enable-auto-tool-choice --tool-call-parser <tool_call_parser>    --reasoning-parser <reasoning_parser>

Why every model gets a tool parser: in vLLM 0.25 `tool_choice` "required" or a named function answers 400
("requires --tool-call-parser to be set") unless the server runs with a parser, and a parser exists only with
--enable-auto-tool-choice. A model whose family is not known gets `hermes`: for a forced call vLLM then constrains
the output to `<tool_call>{"name": ..., "arguments": <the tool's JSON schema>}</tool_call>` (an xgrammar structural
tag) and hermes parses it back, whatever the model's own tool syntax. For `auto` such a model answers in prose.

The names are those vLLM 0.25 registers (vllm/tool_parsers/__init__.py, vllm/reasoning/__init__.py); the table
follows vLLM's tool calling and reasoning docs. Some parsers refuse a tokenizer that lacks their tokens (<think> and
</think> for deepseek_r1 and qwen3, <|python_tag|> for llama3_json, ...: NEEDS_TOKENS), so they are picked only when
the tokenizer has them. vLLM 0.25 returns the reasoning as `reasoning` (it was `reasoning_content` before).

Reads only files: the registry (capabilities) and the daemon (the runner's command line) both use it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

# Registered names in vLLM 0.25.0.
TOOL_CALL_PARSERS = frozenset({
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4",
    "ernie45", "functiongemma", "gemma4", "gigachat3", "glm45", "glm47", "granite", "granite-20b-fc", "granite4",
    "hermes", "hunyuan_a13b", "hy_v3", "internlm", "jamba", "kimi_k2", "lfm2", "llama3_json", "llama4_json",
    "llama4_pythonic", "longcat", "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "olmo3", "openai",
    "phi4_mini_json", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_xml", "seed_oss", "step3", "step3p5", "xlam",
})
REASONING_PARSERS = frozenset({
    "cohere_command3", "cohere_command4", "deepseek_r1", "deepseek_v3", "deepseek_v4", "ernie45", "gemma4", "glm45",
    "glm47", "granite", "holo2", "hunyuan_a13b", "hy_v3", "kimi_k2", "mimo", "minimax_m2", "minimax_m2_append_think",
    "minimax_m3", "mistral", "nemotron_v3", "olmo3", "openai_gptoss", "poolside_v1", "qwen3", "seed_oss", "step3",
    "step3p5",
})
FORCED_CALL_PARSER = "hermes"  # for models of no known family: forced calls (required, named) still work

THINK_START, THINK_END = "<think>", "</think>"
_QWEN3 = {"qwen3", "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen3_omni_moe"}
# Parsers whose vLLM class refuses a tokenizer without these tokens ("could not locate ... in the tokenizer"): picked
# only when the tokenizer has them (or when no tokenizer file could be read).
NEEDS_TOKENS: dict[str, tuple[str, ...]] = {
    "deepseek_v3": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
    "deepseek_v31": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
    "jamba": ("<tool_calls>", "</tool_calls>"),
    "lfm2": ("<|tool_call_start|>", "<|tool_call_end|>"),
    "llama3_json": ("<|python_tag|>",),
    "llama4_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]",),
    "deepseek_r1": (THINK_START, THINK_END),
    "qwen3": (THINK_START, THINK_END),
}
TOKENS_OF_INTEREST = frozenset(token for tokens in NEEDS_TOKENS.values() for token in tokens)

# Architecture (config.json `architectures`) -> (tool parser, reasoning parser if the template thinks), for families
# whose syntax a template marker alone does not tell.
_BY_ARCHITECTURE: dict[str, tuple[str | None, str | None]] = {
    "GptOssForCausalLM": ("openai", "openai_gptoss"),
    "DeepseekV32ForCausalLM": ("deepseek_v32", "deepseek_v3"),
    "DeepseekV4ForCausalLM": ("deepseek_v4", "deepseek_v4"),
    "Ernie4_5_MoeForCausalLM": ("ernie45", "ernie45"),
    "HunYuanMoEV1ForCausalLM": ("hunyuan_a13b", "hunyuan_a13b"),
    "Glm4MoeForCausalLM": ("glm45", "glm45"),
    "MiniMaxM2ForCausalLM": ("minimax_m2", "minimax_m2_append_think"),
    "SeedOssForCausalLM": ("seed_oss", "seed_oss"),
    "GraniteMoeHybridForCausalLM": ("granite4", None),
    "JambaForCausalLM": ("jamba", None),
}

# Template marker -> tool parser; the first that the template holds wins (more specific markers first).
_TOOL_MARKERS: tuple[tuple[str, str], ...] = (
    ("[TOOL_CALLS]", "mistral"),                     # Mistral, Magistral, Devstral
    ("<|tool_calls_section_begin|>", "kimi_k2"),     # Kimi K2
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),        # DeepSeek V3 / R1 (V3.1: see _tool_parser)
    ("<minimax:tool_call>", "minimax_m2"),           # MiniMax M2
    ("<seed:tool_call>", "seed_oss"),                # Seed-OSS
    ("<|tool_call_start|>", "lfm2"),                 # LFM2
    ("<start_function_call>", "functiongemma"),      # FunctionGemma
    ("<|tool_call>", "gemma4"),                      # Gemma 4
    ("<|tool_call|>", "granite"),                    # Granite 3.x
    ("<function_calls>", "olmo3"),                   # Olmo 3
    ("functools[", "phi4_mini_json"),                # Phi-4-mini
    ("<|plugin|>", "internlm"),                      # InternLM 2.5
    ("<tool_calls>", "jamba"),                       # Jamba 1.5
    ("<|python_tag|>", "llama3_json"),               # Llama 3.1 / 3.2 / 3.3
    ("<tool_call>", "hermes"),                       # Qwen2/2.5, Qwen3, QwQ, Hermes 2 Pro / 3, ... (refined below)
)


@dataclasses.dataclass(frozen=True)
class VllmParsers:
    """What one model's vLLM server is started with, and what that lets it do."""

    tool_call_parser: str | None = None  # None: started without tool calling (config said "")
    reasoning_parser: str | None = None
    tool_family: bool = False  # the tool parser fits the model's own syntax, so `auto` calls parse
    template_tools: bool = False  # the chat template renders `tools`

    @property
    def tools(self) -> bool:
        """The model can call tools: its family's parser was found, or its template renders tools."""
        return self.tool_family or self.template_tools

    @property
    def thinking(self) -> bool:
        """The reasoning comes back split from the answer (vLLM's `reasoning`): a reasoning parser was found."""
        return self.reasoning_parser is not None

    def argv(self) -> list[str]:
        args: list[str] = []
        if self.tool_call_parser:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.reasoning_parser:
            args += ["--reasoning-parser", self.reasoning_parser]
        return args


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the table reads from a model folder."""

    config: Mapping[str, Any]
    template: str
    tokens: frozenset[str] | None  # those of TOKENS_OF_INTEREST the tokenizer has; None: no tokenizer files read


def pick_parsers(config: Mapping[str, Any], template: str, tokens: Collection[str] | None = None) -> VllmParsers:
    """The table: config.json + chat template (+ the tokenizer's tokens of interest) -> parsers. Pure."""
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type") or "").lower()
    family = next((_BY_ARCHITECTURE[a] for a in architectures if a in _BY_ARCHITECTURE), None)
    tool = _usable(family[0] if family else _tool_parser(template, model_type), tokens)
    reasoning = _usable(_reasoning_parser(template, model_type, architectures, family), tokens)
    return VllmParsers(tool_call_parser=tool or FORCED_CALL_PARSER, reasoning_parser=reasoning,
                       tool_family=tool is not None, template_tools=_renders_tools(template))


def _tool_parser(template: str, model_type: str) -> str | None:
    marker = next((parser for mark, parser in _TOOL_MARKERS if mark in template), None)
    if marker == "deepseek_v3" and "```json" not in template:
        return "deepseek_v31"  # V3.1 writes <｜tool▁call▁begin｜>name<｜tool▁sep｜>{args}, V3 a fenced JSON block
    if marker == "hermes":
        if "<function=" in template:
            return "qwen3_coder"  # Qwen3-Coder, Qwen3.5, Nemotron 3: <tool_call><function=name><parameter=k>v
        if "<arg_key>" in template:
            return "glm45"  # GLM 4.5 / 4.6 / 4.7: <tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>
        if model_type.startswith("granite"):
            return "granite4"  # Granite 4.0 writes Hermes-style calls; vLLM recommends its own parser
    if marker is None and _renders_tools(template):
        if "<|header_start|>" in template:
            return "llama4_json"  # Llama 4's own template asks for JSON calls
        if "<|start_header_id|>" in template:
            return "llama3_json"  # Llama 3.x templates that never name <|python_tag|>
    return marker


def _usable(parser: str | None, tokens: Collection[str] | None) -> str | None:
    if parser is None or tokens is None or all(token in tokens for token in NEEDS_TOKENS.get(parser, ())):
        return parser
    return None


def _reasoning_parser(template: str, model_type: str, architectures: list[str],
                      family: tuple[str | None, str | None] | None) -> str | None:
    thinks = THINK_START in template or THINK_END in template
    if family is not None:
        always = family[1] in ("openai_gptoss", "deepseek_v3", "deepseek_v4")  # no template, or thinking by kwarg
        return family[1] if always or "think" in template else None
    if "[THINK]" in template:
        return "mistral"  # Magistral
    if "<seed:think>" in template:
        return "seed_oss"
    if "<|channel>" in template:
        return "gemma4"
    if model_type.startswith("granite") and "thinking" in template and "thought process" in template:
        return "granite"  # Granite 3.2+: thinking=True in chat_template_kwargs
    if not thinks:
        return None
    if model_type in _QWEN3:
        # Qwen3 (hybrid: enable_thinking) and Qwen3-Thinking-2507 (the prompt opens <think>); an Instruct-2507
        # template only strips old reasoning from the history and its model never thinks.
        return "qwen3" if "enable_thinking" in template or _prompt_opens_think(template) else None
    if "<|tool_calls_section_begin|>" in template:
        return "kimi_k2"  # Kimi K2 Thinking
    if any(a.startswith("DeepseekV3") for a in architectures) and re.search(r"\bthinking\b", template):
        return "deepseek_v3"  # DeepSeek V3.1: thinking=True in chat_template_kwargs
    if model_type == "olmo3":
        return "olmo3"
    if model_type == "nemotron_h":
        return "nemotron_v3"
    return "deepseek_r1"  # DeepSeek R1 and its distills, QwQ, Phi-4-reasoning, ...: <think> ... </think> answer


def _prompt_opens_think(template: str) -> bool:
    at = template.rfind("add_generation_prompt")
    return at >= 0 and THINK_START in template[at:]


def _renders_tools(template: str) -> bool:
    return "tools" in template


def apply_overrides(found: VllmParsers, tool_call_parser: str | None = None,
                    reasoning_parser: str | None = None) -> VllmParsers:
    """The per-model settings win: None leaves what the table found, "" means none, a name means that parser."""
    if tool_call_parser is not None:
        found = dataclasses.replace(found, tool_call_parser=tool_call_parser or None,
                                    tool_family=bool(tool_call_parser))
    if reasoning_parser is not None:
        found = dataclasses.replace(found, reasoning_parser=reasoning_parser or None)
    return found


def read_model_files(model: Path | Mapping[str, Path]) -> ModelFacts:
    """config.json, the chat template text and the tokenizer's tokens of interest, from a model folder or from its
    files by name (as registry.metadata sees them before the store has them). The template is the one transformers
    (so vLLM) uses: chat_template.jinja, else chat_template.json, else tokenizer_config.json's (named templates
    joined: Hermes 2 Pro keeps its tool syntax in "tool_use"). Missing or unreadable files count as empty."""
    files: Mapping[str, Path] = model if isinstance(model, Mapping) else _Folder(model)
    config = _json(files.get("config.json"))
    tokenizer_config = _json(files.get("tokenizer_config.json"))
    try:
        templates = [files["chat_template.jinja"].read_text(errors="replace")]
    except (KeyError, OSError):
        templates = (_templates(_json(files.get("chat_template.json")).get("chat_template"))
                     or _templates(tokenizer_config.get("chat_template")))
    return ModelFacts(config=config, template="\n".join(templates), tokens=_tokens(files, tokenizer_config))


def vllm_parsers(model: Path | Mapping[str, Path], tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None) -> VllmParsers:
    """The parsers a model's vLLM server starts with (its folder, or its files by name), after the per-model
    settings (ModelOverrides' tool_call_parser / reasoning_parser: None = from the table, "" = none). `.tools` and
    `.thinking` say what the model can do through vLLM."""
    facts = read_model_files(model)
    return apply_overrides(pick_parsers(facts.config, facts.template, facts.tokens), tool_call_parser,
                           reasoning_parser)


class _Folder(Mapping[str, Path]):
    """A model folder seen as its files by name (only the names asked for are looked at)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __getitem__(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise KeyError(name)
        return path

    def __iter__(self) -> Iterator[str]:
        return (p.name for p in self.folder.iterdir()) if self.folder.is_dir() else iter(())

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _templates(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        return [str(t.get("template") or "") for t in value if isinstance(t, dict)]
    return []


def _tokens(files: Mapping[str, Path], tokenizer_config: Mapping[str, Any]) -> frozenset[str] | None:
    found: set[str] = set()
    read = False
    tokenizer = _json(files.get("tokenizer.json"))
    if tokenizer:
        read = True
        found.update(str(t.get("content")) for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict))
        vocab = (tokenizer.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            found.update(t for t in TOKENS_OF_INTEREST if t in vocab)
    decoder = tokenizer_config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        read = True
        found.update(str(t.get("content")) for t in decoder.values() if isinstance(t, dict))
    for name in ("added_tokens.json", "vocab.json"):
        table = _json(files.get(name))
        if table:
            read = True
            found.update(t for t in TOKENS_OF_INTEREST if t in table)
    return frozenset(found & TOKENS_OF_INTEREST) if read else None
