"""Pulls as the daemon runs them: hub settings from the one Settings object, and one shared Downloader, so
that two pulls of a model (or of models sharing a file) download each file once."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import AsyncIterator
from typing import Any

from mgr.registry.pull import pull_events
from mgr.registry.sources import SourceConfig
from mgr.registry.store import Store
from mgr.registry.transfer import Downloader

from .config import Settings
from .gpus import GpuInventory


def source_config(settings: Settings) -> SourceConfig:
    return SourceConfig(
        hf_endpoint=settings.hf_endpoint,
        hf_mirror_endpoint=settings.hf_mirror_endpoint,
        modelscope_endpoint=settings.modelscope_endpoint,
        hf_token=settings.hf_token,
        hf_mirror_token=settings.hf_mirror_token,
        modelscope_token=settings.modelscope_token,
        order=settings.sources,  # type: ignore[arg-type]
    )


class Pulls:
    def __init__(self, store: Store, settings: Settings, gpus: GpuInventory) -> None:
        self.store = store
        self.settings = settings
        self.gpus = gpus
        self.sources = source_config(settings)
        self.downloader = Downloader(store)

    @functools.cached_property
    def preferred_format(self) -> str:
        """What a short name without a format means: safetensors where vLLM can run (a GPU and vLLM),
        GGUF otherwise."""
        vllm_here = self.settings.vllm_python is not None or importlib.util.find_spec("vllm") is not None
        return "safetensors" if vllm_here and self.gpus.gpus() else "gguf"

    def events(self, reference: str) -> AsyncIterator[dict[str, Any]]:
        return pull_events(self.store, reference, sources=self.sources, downloader=self.downloader,
                           prefer=self.preferred_format)

    async def aclose(self) -> None:
        await self.downloader.aclose()
