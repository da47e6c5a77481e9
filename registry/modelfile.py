"""Ollama's Modelfile and the settings a model can carry beyond its files: FROM, PARAMETER, TEMPLATE, SYSTEM,
ADAPTER, MESSAGE, LICENSE.

    FROM smollm2:latest                  # a model in the store, or a .gguf file, or a model folder
    PARAMETER temperature 0.2            # one of Ollama's options (PARAMETERS below); stop may repeat
    PARAMETER stop "<|im_end|>"
    TEMPLATE \"\"\"{% for m in messages %}...{% endfor %}\"\"\"   # a Jinja chat template (not Go's)
    SYSTEM You are a terse assistant.
    ADAPTER ./lora.gguf                  # a GGUF LoRA adapter (llama.cpp) or a PEFT folder (vLLM)
    MESSAGE user Hello                   # history put before every conversation
    LICENSE \"\"\"MIT ...\"\"\"

Instructions are case-insensitive; `#` starts a comment line; a value runs to the end of its line unless it is
quoted ("..." or \"\"\"...\"\"\", which may span lines). Parsing follows Ollama's parser/parser.go; a bad line is
a ModelfileError that names its line number.

This module also prints what `/api/show` answers (the `parameters` text, the regenerated Modelfile) and checks
a template's Jinja syntax: mgr's engines render Jinja chat templates (as transformers and GGUF metadata carry
them), not Ollama's Go templates. Stdlib only at import: the CLI reads Modelfiles too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import MgrError

# Ollama's options (api/types.go Options and Runner) by type: what a PARAMETER may set.
PARAMETERS: dict[str, type] = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int, "num_keep": int,
    "draft_num_predict": int, "seed": int, "num_predict": int, "top_k": int, "repeat_last_n": int,
    "top_p": float, "min_p": float, "typical_p": float, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float,
    "use_mmap": bool,
    "stop": list,
}
# Accepted and dropped, as Ollama does (it prints a warning): options removed from its engines.
DEPRECATED_PARAMETERS = frozenset({"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only",
                                   "use_mlock", "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z"})
INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "message", "license")
# Ollama's own instructions that name its Go engine's parts; mgr's engines have no such thing.
_OLLAMA_ONLY = {"draft": "draft models", "renderer": "Ollama's built-in renderers",
                "parser": "Ollama's built-in output parsers", "requires": "Ollama version requirements"}
MESSAGE_ROLES = ("system", "user", "assistant")
_TRUE, _FALSE = {"1", "t", "T", "TRUE", "true", "True"}, {"0", "f", "F", "FALSE", "false", "False"}  # Go ParseBool


class ModelfileError(MgrError, ValueError):
    """A Modelfile or a create request that cannot become a model; says which line or field and why."""

    status = 400

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclasses.dataclass
class Modelfile:
    """A parsed Modelfile; `sources` are the FROM values as written (a model name or a path)."""

    sources: list[str] = dataclasses.field(default_factory=list)
    adapters: list[str] = dataclasses.field(default_factory=list)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)
    licenses: list[str] = dataclasses.field(default_factory=list)


# parameters ------------------------------------------------------------------------------------------------
def parameter_from_text(name: str, text: str) -> Any:
    """A PARAMETER line's value typed as Ollama's option is (api.FormatParams). Raises ValueError."""
    kind = _kind(name)
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"invalid {kind.__name__} value {text!r} for parameter {name!r}") from None
    if kind is bool:
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"invalid bool value {text!r} for parameter {name!r}: use true or false")
    return text  # stop: one word per line, gathered into a list by the caller


def parameter_value(name: str, value: Any) -> Any:
    """An /api/create parameter (a JSON value) checked against Ollama's option types. Raises ValueError."""
    kind = _kind(name)
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"parameter {name!r} must be a string or a list of strings")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"parameter {name!r} must be true or false")
    if isinstance(value, str):
        return parameter_from_text(name, value.strip())  # Ollama's CLI sends Modelfile values typed; be lenient
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {name!r} must be a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"parameter {name!r} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def check_parameters(parameters: Any) -> dict[str, Any]:
    """/api/create's `parameters`, each checked and typed; deprecated ones dropped. Raises ModelfileError."""
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise ModelfileError('parameters must be an object: {"temperature": 0.2, "stop": ["..."]}')
    checked: dict[str, Any] = {}
    for name, value in parameters.items():
        if name in DEPRECATED_PARAMETERS or value is None:
            continue
        try:
            checked[name] = parameter_value(name, value)
        except ValueError as e:
            raise ModelfileError(str(e)) from None
    return checked


def _kind(name: str) -> type:
    if name not in PARAMETERS:
        raise ValueError(f"unknown parameter {name!r}: expected one of {', '.join(sorted(PARAMETERS))}")
    return PARAMETERS[name]


def _go_value(value: Any) -> str:
    """A value as Go's %v prints the JSON-decoded one (numbers are float64 there: 4096, 0.7, 1e-05)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _values(parameters: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, value) in name order, a list (stop) as one pair per item, as Ollama prints them."""
    for name in sorted(parameters):
        value = parameters[name]
        for item in value if isinstance(value, list) else [value]:
            yield name, item


def render_parameters(parameters: Mapping[str, Any]) -> str:
    """/api/show's `parameters`: `name value` per line, the name padded to 30, strings in double quotes
    (Ollama's fmt "%-30s %#v")."""
    return "\n".join(f"{name:<30} {_go_quoted(value)}" for name, value in _values(parameters))


def _go_quoted(value: Any) -> str:
    """Go's %#v: a string double-quoted (its quotes and backslashes escaped), other values as %v."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else _go_value(value)


# templates -------------------------------------------------------------------------------------------------
def check_template(template: str) -> None:
    """A TEMPLATE's Jinja syntax (the daemon refuses Go template syntax before this: operations.jinja_template)."""
    import jinja2  # the CLI never checks templates: only the daemon pays for jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelfileError(f"template error: {e.message} (line {e.lineno} of the template)") from None


# the Modelfile text ----------------------------------------------------------------------------------------
def quote(value: str) -> str:
    """A value as a Modelfile writes it: bare when it fits on its line, else in quotes (triple when it holds
    a double quote), as Ollama's parser.quote does; a value that starts with a quote is quoted too."""
    if "\n" in value or value != value.strip() or value.startswith('"') or not value:
        return f'"""{value}"""' if '"' in value else f'"{value}"'
    return value


def render_modelfile(name: str, model_path: str, adapter_paths: Sequence[str], template: str, system: str,
                     parameters: Mapping[str, Any], messages: Sequence[Mapping[str, Any]],
                     licenses: Sequence[str]) -> str:
    """/api/show's `modelfile`, in Ollama's order: FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER, LICENSE, MESSAGE."""
    lines = ['# Modelfile generated by "mgr show"', "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {name}", "", f"FROM {model_path}"]
    lines += [f"ADAPTER {path}" for path in adapter_paths]
    if template:
        lines.append(f"TEMPLATE {quote(template)}")
    if system:
        lines.append(f"SYSTEM {quote(system)}")
    lines += [f"PARAMETER {key} {quote(value) if isinstance(value, str) else _go_value(value)}"
              for key, value in _values(parameters)]
    lines += [f"LICENSE {quote(text)}" for text in licenses]
    lines += [f"MESSAGE {m.get('role', '')} {quote(str(m.get('content') or ''))}" for m in messages]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> Modelfile:
    """Raises ModelfileError (with the line number) for a bad line, and when there is no FROM."""
    lines = text.lstrip("\ufeff").splitlines()
    result = Modelfile()
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].strip()
        raw = lines[index].lstrip()  # a quoted value keeps its trailing spaces
        index += 1
        if not line or line.startswith("#"):
            continue
        head = re.match(r"([A-Za-z]+)(?=[ \t]|$)", line)
        if head is None:
            word = line.split()[0]
            raise ModelfileError(f"{word!r} is not an instruction: expected one of "
                                 f"{', '.join(i.upper() for i in INSTRUCTIONS)}", number)
        instruction = head.group(1).lower()
        rest = raw[head.end():].lstrip(" \t")
        if instruction in _OLLAMA_ONLY:
            raise ModelfileError(f"{instruction.upper()} is not supported: mgr has no {_OLLAMA_ONLY[instruction]}",
                                 number)
        if instruction not in INSTRUCTIONS:
            raise ModelfileError(f"unknown instruction {head.group(1)!r}: expected one of "
                                 f"{', '.join(i.upper() for i in INSTRUCTIONS)}", number)
        key = ""
        if instruction in ("parameter", "message"):
            split = re.match(r"(\S+)[ \t]+", rest)
            if split is None:
                what = "a name and a value" if instruction == "parameter" else "a role and its content"
                raise ModelfileError(f"{instruction.upper()} needs {what}", number)
            key, rest = split.group(1), rest[split.end():]
        value, index = _value(rest, lines, index, number, instruction)
        _apply(result, instruction, key, value, number)
    if not result.sources:
        raise ModelfileError("no FROM line: a Modelfile starts from a model (FROM name, or FROM ./model.gguf)")
    return result


def _value(first: str, lines: list[str], index: int, number: int, instruction: str) -> tuple[str, int]:
    """The value that starts with `first` on line `number`, and the index of the line after it. A quoted value
    may span lines; it ends at the line that closes its quotes."""
    if not first.strip():
        raise ModelfileError(f"{instruction.upper()} needs a value", number)
    for opener in ('"""', '"'):
        if not first.startswith(opener):
            continue
        text = first
        while True:
            trimmed = text.rstrip()
            if trimmed.endswith(opener) and len(trimmed) >= 2 * len(opener):
                return trimmed[len(opener):-len(opener)], index
            if index >= len(lines):
                raise ModelfileError(f"the value quoted with {opener} that starts here is never closed", number)
            text += "\n" + lines[index]
            index += 1
    return first.strip(), index


def _apply(result: Modelfile, instruction: str, key: str, value: str, number: int) -> None:
    if instruction == "from":
        result.sources.append(value)
    elif instruction == "adapter":
        result.adapters.append(value)
    elif instruction == "template":
        result.template = value
    elif instruction == "system":
        result.system = value
    elif instruction == "license":
        result.licenses.append(value)
    elif instruction == "message":
        if key.lower() not in MESSAGE_ROLES:
            raise ModelfileError(f"message role must be one of {', '.join(MESSAGE_ROLES)}, not {key!r}", number)
        result.messages.append({"role": key.lower(), "content": value})
    else:
        name = key.lower()
        if name in DEPRECATED_PARAMETERS:
            return
        try:
            typed = parameter_from_text(name, value)
        except ValueError as e:
            raise ModelfileError(str(e), number) from None
        if PARAMETERS[name] is list:
            result.parameters.setdefault(name, []).append(typed)
        else:
            result.parameters[name] = typed
