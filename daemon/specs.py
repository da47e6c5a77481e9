"""Load specs: how a model will be loaded (context, parallel slots, the memory it will take), from its
manifest, the settings and what earlier loads of it really used."""

from __future__ import annotations

from collections.abc import Callable

from mgr.registry.capabilities import CAPABILITIES
from mgr.registry.config import Settings
from mgr.registry.store import Store
from mgr.registry.vllm_parsers import vllm_parsers

from .memory import default_context, estimate
from .runners.base import LoadSpec
from .runners.engines import DEFAULT_PARALLEL


def runner_key(spec: LoadSpec) -> tuple[str, ...]:
    """What a runner serves, whatever the model is called: its files and what changes the load (template,
    adapter). Models equal here (aliases from `mgr cp`, or a derived model that only adds SYSTEM or PARAMETERs)
    share one runner. vLLM serves one model name per process (--served-model-name, LoRA modules by name), so a
    safetensors model's name stays part of it."""
    name = spec.name.lower() if spec.format != "gguf" else ""
    return (spec.format, str(spec.model_path), str(spec.projector or ""), spec.chat_template or "",
            str(spec.adapter or ""), name)


def same_load(a: LoadSpec, b: LoadSpec) -> bool:
    """Whether a runner started for `a` serves `b` as it is: the same files and the same load settings."""
    return runner_key(a) == runner_key(b) and (a.num_ctx, a.num_parallel) == (b.num_ctx, b.num_parallel)


class SpecBook:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        # What runners really used, by (digest, num_ctx, num_parallel): better than any estimate next time.
        self._learned: dict[tuple[str, int, int], int] = {}
        self._specs: dict[tuple[str, int | None], tuple[int, LoadSpec]] = {}  # by the store's generation
        # The GPUs' total memory in bytes (0 on the CPU), for the default context; the scheduler's Lifecycle,
        # which reads the GPUs, sets it.
        self.gpu_memory: Callable[[], int] = lambda: 0

    def spec_for(self, name: str, num_ctx: int | None = None) -> LoadSpec:
        """Raises ModelNotFound for a model the store does not have. Cached until the store or what was
        learned changes: the fast path must not read manifests from disk."""
        key = (name.lower(), num_ctx)
        cached = self._specs.get(key)
        if cached is not None and cached[0] == self.store.generation:
            return cached[1]
        spec = self._build(name, num_ctx)
        self._specs[key] = (self.store.generation, spec)
        return spec

    def _build(self, name: str, num_ctx: int | None) -> LoadSpec:
        manifest = self.store.get(name)
        overrides = self.settings.for_model(manifest.name)
        parallel = overrides.num_parallel or self.settings.num_parallel or DEFAULT_PARALLEL[manifest.format]
        # the request's, the model's config table's, its Modelfile's (PARAMETER num_ctx), the daemon's
        gpu_memory = self.gpu_memory()
        ctx = num_ctx or overrides.num_ctx or int(manifest.parameters.get("num_ctx") or 0) or self.settings.num_ctx \
            or default_context(
            gpu_memory, manifest.context_length, manifest.format, manifest.size, manifest.model_info, parallel)
        if manifest.context_length:
            ctx = min(ctx, manifest.context_length)
        arch = manifest.model_info.get("general.architecture")
        need = self._learned.get((manifest.digest, ctx, parallel)) or estimate(
            manifest.format, manifest.size, manifest.model_info, ctx, parallel, on_gpu=gpu_memory > 0)
        model_path = self.store.model_path(manifest)
        capabilities = manifest.capabilities
        parsers = None
        if manifest.format == "safetensors":
            # Read once here (its files, the config's overrides); the vLLM runner starts with these parsers
            parsers = vllm_parsers(model_path, overrides.tool_call_parser, overrides.reasoning_parser)
            if "completion" in capabilities:  # on vLLM, tools and thinking are what the parsers make of them
                on_vllm = {"tools": parsers.tools, "thinking": parsers.thinking}
                capabilities = [c for c in CAPABILITIES if on_vllm.get(c, c in capabilities)]
        return LoadSpec(
            name=manifest.name,
            digest=manifest.digest,
            format=manifest.format,
            model_path=model_path,
            num_ctx=ctx,
            num_parallel=parallel,
            size=manifest.size,
            estimate=need,
            layers=int(manifest.model_info.get(f"{arch}.block_count") or 0),
            pinned=overrides.gpus,
            capabilities=tuple(capabilities),
            projector=self.store.projector_path(manifest),
            parsers=parsers,
            chat_template=manifest.chat_template or None,
            adapter=self.store.adapter_path(manifest),
            system=manifest.system,
            messages=manifest.messages,
            parameters=manifest.parameters,
        )

    def learn(self, spec: LoadSpec, used: int) -> None:
        """What a runner of this spec really took: the estimate for its next load."""
        self._learned[(spec.digest, spec.num_ctx, spec.num_parallel)] = used
        # the cached specs of this model estimated from what we knew before; other models' stay right
        self._specs = {key: cached for key, cached in self._specs.items() if cached[1].digest != spec.digest}

    def keep_alive_for(self, name: str, requested: float | None) -> float:
        if requested is not None:
            return requested
        override = self.settings.for_model(name).keep_alive
        return override if override is not None else self.settings.keep_alive
