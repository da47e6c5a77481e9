"""Pulls as the daemon runs them: hub settings from the one Settings object, and one shared Downloader, so
that two pulls of a model (or of models sharing a file) download each file once.

A pull is planned first (`plan`: every 4xx is raised there, before anything downloads), then fetched as a
stream of events (`fetch`: the planning events, then the download's, ending in "success" or raising its error)."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import AsyncGenerator

from mgr.registry.catalog import Format
from mgr.registry.config import Settings
from mgr.registry.pull import PullEvent, PullPlan, plan_pull
from mgr.registry.store import Store
from mgr.registry.transfer import Downloader

from .gpus import GpuInventory
from .metrics import metered_pull


class Pulls:
    def __init__(self, store: Store, settings: Settings, gpus: GpuInventory) -> None:
        self.store = store
        self.settings = settings
        self.gpus = gpus
        self.downloader = Downloader(store)

    @functools.cached_property
    def preferred_format(self) -> Format:
        """What a short name without a format means: safetensors where vLLM can run (a GPU and vLLM),
        GGUF otherwise."""
        vllm_here = self.settings.vllm_python is not None or importlib.util.find_spec("vllm") is not None
        return "safetensors" if vllm_here and self.gpus.gpus() else "gguf"

    async def plan(self, reference: str) -> PullPlan:
        """Resolve, list and select; raises PullError (InvalidReference 400, UnknownModel/RepoNotFound/TagNotFound
        404, AccessDenied 403, NoModelFiles 422, SourceUnreachable 502, BadListing 502: a file name or hash the
        hub listed that mgr refuses) with its `status`."""
        return await plan_pull(self.store, reference, sources=self.settings.hubs, prefer=self.preferred_format)

    def fetch(self, plan: PullPlan) -> AsyncGenerator[PullEvent, None]:
        """Fetch a planned pull through the shared downloader, as its events: the planning ones, then progress up
        to "success"; raises the fetch's error (TransferError 502, DiskFull 507, InvalidModel 400) after the last
        event. Nothing downloads until the first step; closing the iterator (aclose) cancels the download, and
        what it fetched stays resumable."""
        return metered_pull(plan.events(self.downloader))  # bytes and speed for /metrics

    async def aclose(self) -> None:
        await self.downloader.aclose()
