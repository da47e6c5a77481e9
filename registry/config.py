"""Configuration: one typed object, read once.

Precedence: explicit overrides (CLI flags) > environment (MGR_*) > config file > defaults. The config file is
`config.toml` in the user config dir, or `/etc/mgr/config.toml` when running as the system service
(MGR_CONFIG names another). Every path comes from platformdirs so that the daemon, the CLI and the tests agree.

The hub settings (sources, <hub>_endpoint, <hub>_token and their environment variables) come from the table
of hubs in hubs.py and are handed to pulls as one SourceConfig, `Settings.hubs`.

This module is imported by the CLI on every start, so it stays light: stdlib + platformdirs (and hubs.py,
stdlib only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import platformdirs

from .hubs import HUBS, SOURCES, Source, SourceConfig

DEFAULT_PORT = 11434
SYSTEM_CONFIG = Path("/etc/mgr/config.toml")


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting and what is accepted."""


@dataclasses.dataclass(frozen=True)
class ModelOverrides:
    """Per-model settings from the config file's `[models."name"]` tables."""

    num_parallel: int | None = None
    num_ctx: int | None = None
    keep_alive: float | None = None
    gpus: tuple[int, ...] | None = None  # pin the model to these GPU indices
    vllm_args: tuple[str, ...] = ()  # extra command-line arguments for its vLLM server
    # vLLM's --tool-call-parser / --reasoning-parser for it: None = picked from the model (registry/vllm_parsers.py),
    # "" = none, else that parser's name.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # Run it on the Ray cluster (ray_address) over this many GPUs, even where it would fit on this machine
    ray_gpus: int | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = f"127.0.0.1:{DEFAULT_PORT}"
    models_dir: Path = Path()
    state_dir: Path = Path()
    # Seconds; 0 = unload after each request; negative = never unload.
    keep_alive: float = 300.0
    # None = the engine's own default (4 for llama.cpp, 256 for vLLM).
    num_parallel: int | None = None
    max_loaded_models: int | None = None  # None = 3 x GPUs (3 on CPU)
    max_queue: int = 512
    load_timeout: float = 600.0
    # Seconds a runner may send nothing while a request waits on it: before its answer begins (its queue, the
    # prompt, a whole non-streamed answer), and between two parts of an answer. Past either, the request fails
    # (504) and the runner is taken as hung and started again. 0 = no limit.
    runner_timeout: float = 300.0
    runner_idle_timeout: float = 120.0
    # On SIGTERM: seconds the answers in flight may take to finish before they are ended with an error line.
    shutdown_timeout: float = 10.0
    # Logs on stderr (journald under systemd): DEBUG lines too, and "text" or "json" (one object per line).
    debug: bool = False
    log_format: str = "text"
    # The context length when a request or the model's settings set none; None = chosen per model from its
    # trained length and the GPUs' memory (Ollama's tiers: daemon/memory.py default_context).
    num_ctx: int | None = None
    # Threads for the llama.cpp engine; None = physical cores.
    num_thread: int | None = None
    # The llama.cpp engine's prompt cache: each slot keeps its KV cache after a request, and a prompt that starts
    # as a slot's cached tokens do reads only the rest (vLLM's prefix caching is its own and always on).
    cache_prompt: bool = True
    # The Python that has vLLM installed; None = the one running mgr.
    vllm_python: str | None = None
    # The warm tier: idle vLLM models sleep (weights to host RAM) instead of being stopped.
    vllm_sleep: bool = True
    # A Ray cluster for models that fit no single machine (vLLM --distributed-executor-backend ray):
    # its address, how many machines, and GPUs per machine (None = as many as this one has).
    ray_address: str | None = None
    ray_nodes: int = 1
    ray_gpus_per_node: int | None = None
    # Hubs: the order a short name tries them, their endpoints, and tokens (never sent to another hub), from the
    # settings `sources`, `<hub>_endpoint` and `<hub>_token`.
    hubs: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    models: Mapping[str, ModelOverrides] = dataclasses.field(default_factory=dict)
    # Who may call (daemon/guards.py). Keys: with any set, every endpoint but GET / needs one (Bearer or
    # x-api-key); api_keys_file adds one key per line. Origins a browser page may call from, beyond Ollama's
    # defaults (localhost, 127.0.0.1, [::1] on any port; app://, file://, tauri://, vscode-webview://); "*" = any.
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    origins: tuple[str, ...] = ()
    # Limits, in bytes: a request body for generation, embeddings and create (images travel as base64), and for
    # every other endpoint (blob uploads: the free disk); a request's line and headers together (431 past it).
    max_body_size: int = 64 << 20
    max_control_body_size: int = 1 << 20
    max_header_size: int = 64 << 10
    # Connections: open at once (503 past it); seconds a request's line and headers may take to arrive
    # (a connection that sends nothing is closed then); seconds an idle keep-alive connection stays open.
    max_connections: int = 1024
    header_timeout: float = 10.0
    idle_timeout: float = 5.0
    # The CLI's: seconds a daemon has to answer a control call (list, ps, ...) or the ping before a long one.
    client_timeout: float = 30.0

    @property
    def bind_host(self) -> str:
        return split_host(self.host)[0]

    @property
    def bind_port(self) -> int:
        return split_host(self.host)[1]

    @property
    def base_url(self) -> str:
        host, port = split_host(self.host)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @property
    def runner_log_dir(self) -> Path:
        return self.state_dir / "runners"

    def for_model(self, name: str) -> ModelOverrides:
        return self.models.get(name.lower(), ModelOverrides())


def split_host(value: str) -> tuple[str, int]:
    """Split MGR_HOST ("127.0.0.1:11434", "0.0.0.0", ":8080", "[::1]:11434", "http://host:port")."""
    value = value.strip()
    value = re.sub(r"^https?://", "", value).rstrip("/")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    try:
        port_number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"MGR_HOST={value!r}: the port must be a number, as in 127.0.0.1:11434") from None
    return host or "127.0.0.1", port_number


_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_PARTS = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


# The longest duration: Go's time.Duration (2**63 ns, about 292 years), what Ollama's keep_alive is. Longer ones are
# clamped to it either way, so that now + a duration is still a date and a timer (keep_alive 1e308 broke /api/ps).
MAX_DURATION_SECONDS = (2**63 - 1) / 1e9


def parse_duration(value: str | int | float, setting: str = "keep_alive") -> float:
    """Seconds from Ollama's duration forms: 300, "300", "5m", "1h30m", "-1", "-1m", "0"; NaN is refused, and
    beyond MAX_DURATION_SECONDS (1e308, "99999999999999h", a 400-digit number) is clamped to it."""
    seconds = _duration_seconds(value, setting)
    if math.isnan(seconds):
        raise ConfigError(f"{setting}: expected a duration such as 5m, 1h or 300, got {value!r}")
    return max(-MAX_DURATION_SECONDS, min(MAX_DURATION_SECONDS, seconds))


def _duration_seconds(value: str | int | float, setting: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{setting}: expected a duration such as 5m, 1h or 300, got {value!r}")
    if isinstance(value, int):
        return float(max(-(2**1000), min(2**1000, value)))  # a float past 1e308 would raise OverflowError
    if isinstance(value, float):
        return value
    text = str(value).strip().lower()
    match = _DURATION.match(text)
    if match:
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    parts = _DURATION_PARTS.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    raise ConfigError(f"{setting}: expected a duration such as 5m, 1h or 300, got {value!r}")


def _positive_int(value: Any, setting: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting}: expected a positive whole number, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"{setting}: expected a positive whole number, got {value!r}")
    return number


def _boolean(value: Any, setting: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{setting}: expected true or false, got {value!r}")


def _sources(value: Any, setting: str) -> tuple[Source, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    names = [str(v).strip() for v in items if str(v).strip()]
    hubs: dict[str, Source] = {hub.id: hub.id for hub in HUBS.values()}
    if not names or any(n not in hubs for n in names):
        raise ConfigError(f"{setting}: expected a list of {', '.join(hubs)}, got {value!r}")
    return tuple(hubs[n] for n in names)


def _endpoint(value: Any, setting: str) -> str:
    text = str(value).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(f"{setting}: expected a URL such as https://huggingface.co, got {value!r}")
    return text


def _string(value: Any, setting: str) -> str:
    return str(value)


def _string_tuple(value: Any, setting: str) -> tuple[str, ...]:
    """A list in TOML, or comma-separated text in the environment; blanks dropped."""
    items = value if isinstance(value, list) else str(value).split(",")
    return tuple(text for v in items if (text := str(v).strip()))


_SIZE = re.compile(r"^(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?$")
_SIZE_UNITS = {None: 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30}


def _size(value: Any, setting: str) -> int:
    """Bytes, as 1048576, "64MiB", "512k", "1GB"."""
    match = _SIZE.match(str(value).strip().lower()) if not isinstance(value, bool) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"{setting}: expected a size in bytes such as 65536, 64KiB or 64MiB, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _positive_seconds(value: Any, setting: str) -> float:
    seconds = parse_duration(value, setting)
    if seconds <= 0:
        raise ConfigError(f"{setting}: expected a duration above 0 such as 10s, got {value!r}")
    return seconds


def _log_format(value: Any, setting: str) -> str:
    text = str(value).strip().lower()
    if text not in ("text", "json"):
        raise ConfigError(f"{setting}: expected text or json, got {value!r}")
    return text


def _path(value: Any, setting: str) -> Path:
    return Path(value).expanduser()


# setting name -> (environment variables, first set wins; parser of a value given as text or in TOML)
_FIELDS: dict[str, tuple[tuple[str, ...], Callable[[Any, str], Any]]] = {
    "host": (("MGR_HOST",), _string),
    "models_dir": (("MGR_MODELS",), _path),
    "state_dir": (("MGR_STATE_DIR",), _path),
    "keep_alive": (("MGR_KEEP_ALIVE",), parse_duration),
    "num_parallel": (("MGR_NUM_PARALLEL",), _positive_int),
    "max_loaded_models": (("MGR_MAX_LOADED_MODELS",), _positive_int),
    "max_queue": (("MGR_MAX_QUEUE",), _positive_int),
    "load_timeout": (("MGR_LOAD_TIMEOUT",), parse_duration),
    "runner_timeout": (("MGR_RUNNER_TIMEOUT",), parse_duration),
    "runner_idle_timeout": (("MGR_RUNNER_IDLE_TIMEOUT",), parse_duration),
    "shutdown_timeout": (("MGR_SHUTDOWN_TIMEOUT",), parse_duration),
    "debug": (("MGR_DEBUG",), _boolean),
    "log_format": (("MGR_LOG_FORMAT",), _log_format),
    "num_ctx": (("MGR_CONTEXT_LENGTH",), _positive_int),
    "num_thread": (("MGR_NUM_THREAD",), _positive_int),
    "cache_prompt": (("MGR_CACHE_PROMPT",), _boolean),
    "vllm_python": (("MGR_VLLM_PYTHON",), _string),
    "vllm_sleep": (("MGR_VLLM_SLEEP",), _boolean),
    "ray_address": (("MGR_RAY_ADDRESS",), _string),
    "ray_nodes": (("MGR_RAY_NODES",), _positive_int),
    "ray_gpus_per_node": (("MGR_RAY_GPUS_PER_NODE",), _positive_int),
    "api_keys": (("MGR_API_KEYS",), _string_tuple),
    "api_keys_file": (("MGR_API_KEYS_FILE",), _path),
    "origins": (("MGR_ORIGINS",), _string_tuple),
    "max_body_size": (("MGR_MAX_BODY_SIZE",), _size),
    "max_control_body_size": (("MGR_MAX_CONTROL_BODY_SIZE",), _size),
    "max_header_size": (("MGR_MAX_HEADER_SIZE",), _size),
    "max_connections": (("MGR_MAX_CONNECTIONS",), _positive_int),
    "header_timeout": (("MGR_HEADER_TIMEOUT",), _positive_seconds),
    "idle_timeout": (("MGR_IDLE_TIMEOUT",), _positive_seconds),
    "client_timeout": (("MGR_CLIENT_TIMEOUT",), _positive_seconds),
    # The hubs, from their table: they become Settings.hubs.
    "sources": (("MGR_SOURCES",), _sources),
    **{f"{hub.setting}_endpoint": (hub.endpoint_env, _endpoint) for hub in HUBS.values()},
    **{f"{hub.setting}_token": (hub.token_env, _string) for hub in HUBS.values()},
}


def _parse(name: str, value: Any) -> Any:
    return _FIELDS[name][1](value, name)


def _hubs(values: dict[str, Any]) -> SourceConfig:
    """Take the hub settings out of `values` (by setting name) and make them one SourceConfig."""
    endpoints: dict[Source, str] = {}
    tokens: dict[Source, str] = {}
    for hub in HUBS.values():
        if (endpoint := values.pop(f"{hub.setting}_endpoint", None)) is not None:
            endpoints[hub.id] = endpoint
        if (token := values.pop(f"{hub.setting}_token", None)) is not None:
            tokens[hub.id] = token
    return SourceConfig(endpoints=endpoints, tokens=tokens, order=values.pop("sources", SOURCES))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def _model_overrides(table: Any, path: Path) -> dict[str, ModelOverrides]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [models] must be a table of tables, as in [models.\"smollm2:latest\"]")
    result = {}
    for name, values in table.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [models.{name!r}] must be a table")
        unknown = set(values) - {"num_parallel", "num_ctx", "keep_alive", "gpus", "vllm_args", "tool_call_parser",
                                 "reasoning_parser", "ray_gpus"}
        if unknown:
            raise ConfigError(f"{path}: [models.{name!r}] has unknown keys {sorted(unknown)}")
        result[name.lower()] = ModelOverrides(
            num_parallel=_positive_int(values["num_parallel"], "num_parallel") if "num_parallel" in values else None,
            num_ctx=_positive_int(values["num_ctx"], "num_ctx") if "num_ctx" in values else None,
            keep_alive=parse_duration(values["keep_alive"]) if "keep_alive" in values else None,
            gpus=_gpu_list(values["gpus"], path, name) if "gpus" in values else None,
            vllm_args=_string_list(values.get("vllm_args", []), path, name),
            tool_call_parser=_parser_name(values, "tool_call_parser", path, name),
            reasoning_parser=_parser_name(values, "reasoning_parser", path, name),
            ray_gpus=_positive_int(values["ray_gpus"], "ray_gpus") if "ray_gpus" in values else None,
        )
    return result


def _gpu_list(value: Any, path: Path, model: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{path}: [models.{model!r}] gpus must be a list of GPU indices, as in gpus = [1]")
    return tuple(value)


def _string_list(value: Any, path: Path, model: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: [models.{model!r}] vllm_args must be a list of strings")
    return tuple(value)


def _parser_name(values: Mapping[str, Any], key: str, path: Path, model: str) -> str | None:
    """A vLLM parser name as in tool_call_parser = "hermes"; "" turns the parser off; absent = picked from the model."""
    if key not in values:
        return None
    value = values[key]
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]*", value.strip()):
        raise ConfigError(f"{path}: [models.{model!r}] {key} must be a vLLM parser name, as in {key} = \"hermes\", "
                          f"or \"\" for none; got {value!r}")
    return value.strip()


def _keys_file(path: Path) -> tuple[str, ...]:
    """API keys, one a line (blank lines and # comments skipped); read once, at start."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"api_keys_file: cannot read {path} ({e})") from None
    keys = tuple(text for line in lines if (text := line.strip()) and not text.startswith("#"))
    if not keys:
        raise ConfigError(f"api_keys_file: {path} holds no key (one a line)")
    return keys


def default_config_path(env: Mapping[str, str]) -> Path:
    if env.get("MGR_CONFIG"):
        return Path(env["MGR_CONFIG"]).expanduser()
    user = Path(platformdirs.user_config_dir("mgr")) / "config.toml"
    return user if user.exists() or not SYSTEM_CONFIG.exists() else SYSTEM_CONFIG


def load_settings(overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings once. `overrides` holds CLI flags by setting name (None values are ignored)."""
    env = os.environ if env is None else env
    path = default_config_path(env)
    file_values = _read_file(path)
    values: dict[str, Any] = {}
    models = _model_overrides(file_values.pop("models", {}), path)
    for key, raw in file_values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(_FIELDS))}")
        values[key] = _FIELDS[key][1](raw, f"{path}: {key}")  # an error names the file and the key
    for key, (variables, parser) in _FIELDS.items():
        variable = next((v for v in variables if env.get(v)), None)
        if variable is not None:
            values[key] = parser(env[variable], variable)  # an error names the variable, as the user set it
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _parse(key, raw)
    values.setdefault("models_dir", Path(platformdirs.user_data_dir("mgr")) / "models")
    values.setdefault("state_dir", Path(platformdirs.user_state_dir("mgr")))
    split_host(values.get("host", Settings.host))  # fail early on a bad MGR_HOST
    if values.get("api_keys_file") is not None:
        values["api_keys"] = values.get("api_keys", ()) + _keys_file(values["api_keys_file"])
    return Settings(models=models, hubs=_hubs(values), **values)
