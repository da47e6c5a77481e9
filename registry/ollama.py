"""Ollama's models: its manifest (OCI image manifest v2, layers by media type), what each layer becomes in mgr,
and its registry's protocol (`mgr pull ollama://llama3.2:3b`).

A manifest, in Ollama's store (`<models>/manifests/<host>/<namespace>/<model>/<tag>`) and from its registry
(`GET <registry>/v2/<namespace>/<model>/manifests/<tag>`) alike:

    {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
     "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": ..., "size": ...},
     "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:<hex>", "size": N}, ...]}

Layers, and what mgr makes of them:
    .model       the GGUF (one)                      -> the model's file, `model.gguf`
    .projector   a vision projector (GGUF)           -> `mmproj.gguf` beside it (llama.cpp's --mmproj)
    .adapter     a LoRA adapter (GGUF)               -> the model's adapter
    .system      text                                -> its system prompt
    .params      JSON object of options              -> its parameters (those mgr's Modelfile knows)
    .messages    JSON list of {role, content}        -> its history
    .license     text                                -> its license
    .template    a Go template                       -> not used: mgr renders Jinja chat templates, and the GGUF
                                                        carries its own (the note says so)

Blobs come from `GET <registry>/v2/<namespace>/<model>/blobs/<digest>` (the registry may redirect to a CDN), with
Range requests: the downloader fetches them as it fetches a hub's files, resumable and verified by their digest.
The small text layers are read while planning (they are KBs) and verified the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import PullError
from .modelfile import DEPRECATED_PARAMETERS, MESSAGE_ROLES, parameter_value
from .store import Customization

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_PREFIX = "application/vnd.ollama.image."
MODEL, PROJECTOR, ADAPTER = (MEDIA_PREFIX + kind for kind in ("model", "projector", "adapter"))
TEMPLATE, SYSTEM, PARAMS, MESSAGES, LICENSE = (MEDIA_PREFIX + kind for kind in
                                                ("template", "system", "params", "messages", "license"))
TEXT_LAYERS = (TEMPLATE, SYSTEM, PARAMS, MESSAGES, LICENSE)
# What each file layer is called in the mgr model (Ollama's layers have no names).
FILE_NAMES = {MODEL: "model.gguf", PROJECTOR: "mmproj.gguf", ADAPTER: "adapter.gguf"}
MAX_MANIFEST = 1 << 20
MAX_TEXT_LAYER = 4 << 20  # a license can be long; a template, params or system prompt is KBs
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
GGUF_MAGIC = b"GGUF"


class InvalidOllamaManifest(PullError, ValueError):
    """A manifest mgr cannot read as Ollama's (from the registry: the registry's answer is wrong, 502; from a
    store on disk, the importer reports it and skips that model)."""

    status = 502


@dataclasses.dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclasses.dataclass(frozen=True)
class OllamaManifest:
    config: Layer | None
    layers: tuple[Layer, ...]
    digest: str  # sha256 of the manifest's bytes, as Ollama names a model version

    @classmethod
    def parse(cls, data: bytes, where: str) -> OllamaManifest:
        """Raises InvalidOllamaManifest saying what is wrong with the one at `where`."""
        def bad(why: str) -> InvalidOllamaManifest:
            return InvalidOllamaManifest(f"{where}: not an Ollama manifest mgr can read: {why}")

        if len(data) > MAX_MANIFEST:
            raise bad(f"longer than {MAX_MANIFEST} bytes")
        try:
            body = json.loads(data)
        except ValueError as e:
            raise bad(f"not JSON ({e})") from None
        if not isinstance(body, dict) or body.get("schemaVersion") != 2:
            raise bad("expected an object with schemaVersion 2")
        if body.get("mediaType", MANIFEST_MEDIA_TYPE) not in (MANIFEST_MEDIA_TYPE, _OCI_MANIFEST):
            raise bad(f"media type {str(body.get('mediaType'))[:100]!r}")

        def layer(value: Any) -> Layer:
            if not isinstance(value, dict):
                raise bad("a layer that is not an object")
            media, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
            if not isinstance(media, str) or not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise bad(f"a layer without a media type or a sha256 digest: {str(value)[:200]}")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 50:
                raise bad(f"layer {digest} has the size {size!r}")
            return Layer(media, digest, size)

        layers = body.get("layers")
        if not isinstance(layers, list) or not layers:
            raise bad("no layers")
        config = body.get("config")
        return cls(layer(config) if config is not None else None, tuple(layer(v) for v in layers),
                   f"sha256:{hashlib.sha256(data).hexdigest()}")

    def file_layers(self, where: str) -> dict[str, Layer]:
        """The layers that are files of the mgr model, by file name (model.gguf, mmproj.gguf, adapter.gguf).
        Raises InvalidOllamaManifest without exactly one model layer."""
        files: dict[str, Layer] = {}
        for media, name in FILE_NAMES.items():
            found = [layer for layer in self.layers if layer.media_type == media]
            if len(found) > 1:
                raise InvalidOllamaManifest(f"{where}: {len(found)} {media} layers; mgr takes one of each")
            if found:
                files[name] = found[0]
        if "model.gguf" not in files:
            kinds = sorted({layer.media_type.removeprefix(MEDIA_PREFIX) for layer in self.layers})
            raise InvalidOllamaManifest(f"{where}: no GGUF model layer ({MODEL}); it has {', '.join(kinds)}")
        return files

    def text_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type in TEXT_LAYERS]


def customization(texts: Mapping[str, bytes]) -> tuple[Customization, list[str]]:
    """What the text layers (by media type) set on the mgr model, and notes on what was left out."""
    notes: list[str] = []

    def text(media: str) -> str | None:
        return texts[media].decode("utf-8", "replace") if media in texts else None

    if TEMPLATE in texts:
        notes.append("its Go template is not used: mgr renders the GGUF's own Jinja chat template")
    parameters: dict[str, Any] = {}
    if PARAMS in texts:
        try:
            params = json.loads(texts[PARAMS])
        except ValueError:
            params = None
        if not isinstance(params, dict):
            notes.append("its params layer is not a JSON object: left out")
            params = {}
        for key, value in params.items():
            if key in DEPRECATED_PARAMETERS or value is None:
                continue
            try:
                parameters[key] = parameter_value(key, value)
            except ValueError as e:
                notes.append(f"parameter {key} left out: {e}")
    messages: list[dict[str, str]] = []
    if MESSAGES in texts:
        try:
            listed = json.loads(texts[MESSAGES])
        except ValueError:
            listed = None
        valid = isinstance(listed, list) and all(
            isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content"), str)
            for m in listed)
        if valid and isinstance(listed, list):
            messages = [{"role": m["role"], "content": m["content"]} for m in listed]
        else:
            notes.append("its messages layer is not a list of {role, content}: left out")
    license_ = text(LICENSE)
    return Customization(system=text(SYSTEM), parameters=parameters, messages=tuple(messages),
                         license=(license_,) if license_ else ()), notes


def display_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The name Ollama shows for a model, which mgr gives it too: `llama3.2:3b` for its library, `user/m:tag`
    for its registry's other namespaces, `host/namespace/model:tag` for any other registry."""
    if host == "registry.ollama.ai":
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


# -- the registry --------------------------------------------------------------------------------------------------
def manifest_url(endpoint: str, repo: str, tag: str) -> str:
    return f"{endpoint}/v2/{repo}/manifests/{tag}"


def blob_url(endpoint: str, repo: str, digest: str) -> str:
    return f"{endpoint}/v2/{repo}/blobs/{digest}"


def read_verified(read: Callable[[str, int], bytes], url: str, layer: Layer, where: str) -> bytes:
    """A small layer's bytes from `read(url, limit)`, checked against its digest and size (raises
    ChecksumMismatch: a registry serving other bytes is refused, as a big layer's would be)."""
    from .transfer import ChecksumMismatch

    data = read(url, min(layer.size, MAX_TEXT_LAYER) + 1)
    got = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if got != layer.digest or len(data) != layer.size:
        raise ChecksumMismatch(f"{where}: layer {layer.media_type} ({url}) hashes to {got} ({len(data)} bytes), "
                               f"not {layer.digest} ({layer.size} bytes): the registry served other bytes")
    return data
