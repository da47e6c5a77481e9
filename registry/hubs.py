"""The hubs mgr pulls from, in one table: what each is called, how references name it, where it answers by
default, which settings and environment variables change that and give it a token, and what a user is told
when it refuses a gated repo. The settings (config.py), reference parsing (refs.py), the catalog and the
listing code (sources.py) all read this table; adding a hub starts here.

`SourceConfig` is what a pull needs of the settings: endpoints, tokens and the order a short name tries the
hubs. The settings build one (`Settings.hubs`); tests and tools make their own.

Stdlib only: the CLI imports this (through config.py) on every start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

Source = Literal["hf", "hf-mirror", "modelscope", "ollama"]
# The API a hub speaks, which is also the key of its repos in the catalog (the mirror serves Hugging Face's).
# Ollama's registry speaks OCI distribution (manifests and blobs, registry/ollama_registry.py) and has no repos in
# the catalog: a short name reaches it only when MGR_SOURCES names it, as the fallback for names not in the catalog.
Api = Literal["hf", "modelscope", "ollama"]

# Listing is a few small requests: a source that does not answer in this long is treated as unreachable.
LIST_TIMEOUT = 20.0
USER_AGENT = "mgr/0.1"


@dataclasses.dataclass(frozen=True)
class Hub:
    id: Source  # as in MGR_SOURCES, manifests and messages
    api: Api
    host: str  # how references and labels write it: "hf.co"
    hosts: tuple[str, ...]  # every host a reference may name it by (lower case)
    endpoint: str  # the default base URL
    endpoint_env: tuple[str, ...]  # environment variables for the endpoint, first set wins
    token_env: tuple[str, ...]  # the same for its token
    token_hint: str  # what to do when it refuses a gated or private repo
    prefix: str | None = None  # a short form of the host in references: "ms:owner/repo"
    # Whether the token `hf auth login` saved is used when none is set. Never for the mirror: sending a
    # Hugging Face token to a third party must be a choice.
    login_token: bool = False
    in_default_order: bool = True  # tried for short names unless MGR_SOURCES says otherwise

    @property
    def setting(self) -> str:
        """The stem of its settings: `<setting>_endpoint` and `<setting>_token` (config file keys)."""
        return self.id.replace("-", "_")


HUBS: Mapping[Source, Hub] = {
    hub.id: hub
    for hub in (
        Hub(
            id="hf",
            api="hf",
            host="hf.co",
            hosts=("hf.co", "huggingface.co", "www.huggingface.co"),
            endpoint="https://huggingface.co",
            endpoint_env=("MGR_HF_ENDPOINT", "HF_ENDPOINT"),
            token_env=("MGR_HF_TOKEN", "HF_TOKEN"),
            token_hint="set HF_TOKEN (or MGR_HF_TOKEN) to a token from https://huggingface.co/settings/tokens of an "
            "account that has accepted the model's licence on its page",
            login_token=True,
        ),
        Hub(
            id="hf-mirror",
            api="hf",
            host="hf-mirror.com",
            hosts=("hf-mirror.com",),
            endpoint="https://hf-mirror.com",
            endpoint_env=("MGR_HF_MIRROR_ENDPOINT",),
            token_env=("MGR_HF_MIRROR_TOKEN",),
            token_hint="set MGR_HF_MIRROR_TOKEN to a Hugging Face token (the mirror passes it on; it is not sent "
            "there unless you set it) after accepting the model's licence on huggingface.co",
        ),
        Hub(
            id="modelscope",
            api="modelscope",
            host="modelscope.cn",
            hosts=("modelscope.cn", "www.modelscope.cn"),
            endpoint="https://modelscope.cn",
            endpoint_env=("MGR_MODELSCOPE_ENDPOINT",),
            token_env=("MGR_MODELSCOPE_TOKEN", "MODELSCOPE_API_TOKEN"),
            token_hint="set MGR_MODELSCOPE_TOKEN (or MODELSCOPE_API_TOKEN) to a token from "
            "https://modelscope.cn/my/myaccesstoken of an account that has access",
            prefix="ms:",
        ),
        Hub(
            id="ollama",
            api="ollama",
            host="registry.ollama.ai",
            hosts=("registry.ollama.ai",),
            endpoint="https://registry.ollama.ai",
            endpoint_env=("MGR_OLLAMA_REGISTRY",),
            token_env=("MGR_OLLAMA_TOKEN",),
            token_hint="set MGR_OLLAMA_TOKEN to a token the registry (MGR_OLLAMA_REGISTRY) accepts",
            prefix="ollama://",
            in_default_order=False,
        ),
    )
}
SOURCES: tuple[Source, ...] = tuple(hub.id for hub in HUBS.values() if hub.in_default_order)
APIS: tuple[Api, ...] = ("hf", "modelscope")  # the catalog's


def _saved_hf_token() -> str | None:
    """The token `hf auth login` saved, so that a logged-in user can pull gated models without more setup."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an unreadable token file must not stop pulls of public models
        return None


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Endpoints and tokens by hub (a hub left out gets its default endpoint and no token), and the order in
    which a short name tries the hubs."""

    endpoints: Mapping[Source, str] = dataclasses.field(default_factory=dict)
    tokens: Mapping[Source, str] = dataclasses.field(default_factory=dict)
    order: tuple[Source, ...] = SOURCES
    list_timeout: float = LIST_TIMEOUT

    def endpoint(self, source: Source) -> str:
        return self.endpoints.get(source, HUBS[source].endpoint).rstrip("/")

    def token(self, source: Source) -> str | None:
        token = self.tokens.get(source)
        if not token and HUBS[source].login_token:
            return _saved_hf_token()  # a user logged in with `hf auth login` needs nothing more
        return token or None

    def download_headers(self, source: Source) -> dict[str, str]:
        token = self.token(source)
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers
