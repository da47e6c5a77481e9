"""Parse what a user types after `mgr pull`.

    hf.co/{owner}/{repo}[:{tag}][@{revision}]          Hugging Face (also huggingface.co/...)
    hf-mirror.com/{owner}/{repo}[:{tag}][@{revision}]  the same repo, fetched through the mirror
    modelscope.cn/{owner}/{repo}[:{tag}][@{revision}]  ModelScope (also ms:{owner}/{repo}...)
    ollama://[{namespace}/]{model}[:{tag}]               Ollama's registry (MGR_OLLAMA_REGISTRY), `library` by
    registry.ollama.ai/{namespace}/{model}[:{tag}]       default: ollama://llama3.2:3b
    {family}[:{size}[-{variant}]]                      a short name from the catalog (qwen2.5:7b-q4_K_M)

A model from Ollama's registry is named as Ollama names it: `llama3.2:3b` for the library, `{namespace}/{model}:tag`
otherwise.

The model's name in the store is the reference as typed, with `:latest` when no tag is given (Ollama's rule).
Two spellings have no name of their own and are normalised: `ms:owner/repo` is stored as
`modelscope.cn/owner/repo`, and the `@revision` is left out of the name (store names cannot hold `@`; the
revision and commit are kept in the manifest's source record). Every part is checked here, so nothing typed can
reach outside the store or the hub's URL space: no `..`, no path separators where none belong.
"""

from __future__ import annotations

import dataclasses
import re

from .errors import PullError
from .hubs import HUBS, Source
from .names import InvalidName, parse_name

ACCEPTED_FORMS = (
    "hf.co/{owner}/{repo}[:{tag}], huggingface.co/{owner}/{repo}[:{tag}], hf-mirror.com/{owner}/{repo}[:{tag}], "
    "modelscope.cn/{owner}/{repo}[:{tag}] or ms:{owner}/{repo}[:{tag}], each with an optional @{revision}; "
    "ollama://[{namespace}/]{model}[:{tag}] or registry.ollama.ai/{namespace}/{model}[:{tag}]; "
    "or a catalog name such as qwen2.5:7b or qwen2.5:7b-q4_K_M"
)

# Hosts as users type them -> the source that serves them.
HOSTS: dict[str, Source] = {host: hub.id for hub in HUBS.values() for host in hub.hosts}

# Hub owner and repo names: letters, digits, '.', '_', '-', not starting with '.' (so never '.' or '..').
_REPO_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,95}$")
# A tag is a quantization (Q4_K_M) or a file name (model.Q4_1.gguf); it becomes part of the store name.
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# A revision is a branch, tag or commit; '/' is allowed between parts because refs/pr/12 is a real revision.
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
_FAMILY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class InvalidReference(PullError, ValueError):
    status = 400

    def __init__(self, text: str, why: str) -> None:
        super().__init__(f"invalid model reference {text!r}: {why}; accepted forms: {ACCEPTED_FORMS}")
        self.text = text


@dataclasses.dataclass(frozen=True)
class HubReference:
    """A repo named directly on one hub."""

    text: str  # as typed, stripped
    name: str  # the store name: "hf.co/owner/repo:latest"
    source: Source
    repo: str  # "owner/repo"
    tag: str | None  # None when not given or "latest": the default choice
    revision: str | None  # None = the hub's default branch


@dataclasses.dataclass(frozen=True)
class ShortReference:
    """A catalog name: `family[:tag]`, resolved to repos by the catalog."""

    text: str
    name: str  # "qwen2.5:7b-q4_K_M", "qwen2.5:latest"
    family: str  # "qwen2.5", lower case
    tag: str  # as typed: "7b-q4_K_M", "latest"; the catalog and the file choice compare case-insensitively


@dataclasses.dataclass(frozen=True)
class OllamaReference:
    """A model in Ollama's registry: /v2/{namespace}/{model}/manifests/{tag}."""

    text: str
    name: str  # the store name, as Ollama shows it: "llama3.2:3b", "user/model:latest"
    namespace: str  # "library" for Ollama's own
    model: str
    tag: str  # "latest" when not given

    @property
    def repo(self) -> str:
        return f"{self.namespace}/{self.model}"


def ollama_reference(text: str, namespace: str, model: str, tag: str | None) -> OllamaReference:
    """Checks each part (they become URL path segments and the store name)."""
    _check(text, namespace, _REPO_PART, "namespace")
    _check(text, model, _REPO_PART, "model name")
    if tag is not None:
        _check(text, tag, _TAG, "tag")
    path = model if namespace.lower() == "library" else f"{namespace}/{model}"
    return OllamaReference(text=text, name=_store_name(text, path, tag), namespace=namespace, model=model,
                           tag=tag or "latest")


def _parse_ollama(text: str, rest: str) -> OllamaReference:
    if "@" in rest:
        raise InvalidReference(text, "an Ollama model takes no @revision: name its tag")
    path, colon, tag = rest.partition(":")
    parts = path.split("/")
    if len(parts) not in (1, 2):
        raise InvalidReference(text, "expected ollama://[{namespace}/]{model}[:{tag}]")
    namespace, model = parts if len(parts) == 2 else ("library", parts[0])
    return ollama_reference(text, namespace, model, tag if colon else None)


Reference = HubReference | ShortReference | OllamaReference


def _check(text: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.match(value) or ".." in value:
        raise InvalidReference(text, f"{what} {value!r} may only hold letters, digits, '.', '_' and '-' (no '..')")
    return value


def _store_name(text: str, path: str, tag: str | None) -> str:
    try:
        return str(parse_name(f"{path}:{tag or 'latest'}"))
    except InvalidName as e:
        raise InvalidReference(text, str(e)) from None


def _parse_hub(text: str, source: Source, host: str, rest: str) -> HubReference:
    rest, at, revision = rest.partition("@")
    # Accept the revision before the tag as well (owner/repo@rev:tag); people type both.
    if at and ":" in revision and ":" not in rest:
        revision, _, tag_after = revision.partition(":")
        rest = f"{rest}:{tag_after}"
    if at:
        if len(revision) > 100:
            raise InvalidReference(text, "the revision is longer than 100 characters")
        _check(text, revision, _REVISION, "revision")
    path, colon, tag = rest.partition(":")
    parts = path.split("/")
    if len(parts) != 2:
        got = f"got {len(parts)} path part(s) after the host"
        raise InvalidReference(text, f"expected {host}/{{owner}}/{{repo}}, {got}")
    owner, repo = (_check(text, p, _REPO_PART, "repo name part") for p in parts)
    if colon:
        _check(text, tag, _TAG, "tag")
    tag_or_none = tag if colon and tag.lower() != "latest" else None
    return HubReference(
        text=text,
        name=_store_name(text, f"{host}/{owner}/{repo}", tag if colon else None),
        source=source,
        repo=f"{owner}/{repo}",
        tag=tag_or_none,
        revision=revision if at else None,
    )


def parse_reference(text: str) -> Reference:
    """Parse a reference; raises InvalidReference saying which forms are accepted."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference(str(text), "a model reference is required")
    text = text.strip()
    if len(text) > 300:
        raise InvalidReference(text[:40] + "...", "longer than 300 characters")
    if any(c.isspace() or c == "\\" for c in text):
        raise InvalidReference(text, "it contains spaces or backslashes")
    body = re.sub(r"^https?://", "", text, flags=re.IGNORECASE)
    for hub in HUBS.values():
        if hub.prefix and body.lower().startswith(hub.prefix):
            if hub.api == "ollama":
                return _parse_ollama(text, body[len(hub.prefix):])
            return _parse_hub(text, hub.id, hub.host, body[len(hub.prefix):])
    if "/" in body:
        host, _, rest = body.partition("/")
        source = HOSTS.get(host.lower())
        if source is None:
            hint = f"did you mean hf.co/{body}?" if body.count("/") == 1 else f"unknown hub host {host!r}"
            raise InvalidReference(text, hint)
        if HUBS[source].api == "ollama":
            return _parse_ollama(text, rest)
        return _parse_hub(text, source, host.lower(), rest)
    if "@" in body:
        raise InvalidReference(text, "a catalog name takes no @revision; name the hub repo to pin a revision")
    family, colon, tag = body.partition(":")
    _check(text, family, _FAMILY, "model name")
    if colon:
        _check(text, tag, _TAG, "tag")
    return ShortReference(
        text=text,
        name=_store_name(text, family, tag if colon else None),
        family=family.lower(),
        tag=tag if colon else "latest",
    )
