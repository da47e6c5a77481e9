"""Pulls against a local fake hub (tests/fakehub.py), through the real huggingface_hub / modelscope listing code
and our transfer engine: each source and format, fallback, faults, resume after cancel and after kill -9,
shared downloads, and that nothing half-written becomes visible."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from mgr.registry import sources as sources_module
from mgr.registry import transfer as transfer_module
from mgr.registry.catalog import Catalog, UnknownModel
from mgr.registry.errors import PullError
from mgr.registry.hubs import Source, SourceConfig
from mgr.registry.metadata import InvalidModel
from mgr.registry.pull import PullEvent, PullPlan, plan_pull, pull
from mgr.registry.refs import InvalidReference
from mgr.registry.selection import NoModelFiles, TagNotFound
from mgr.registry.sources import AccessDenied, RepoNotFound, SourceUnreachable
from mgr.registry.store import Store
from mgr.registry.transfer import ChecksumMismatch, DiskFull, Downloader, TransferOptions

sys.path.insert(0, str(Path(__file__).parent))
from fakehub import FakeHub, dead_endpoint, partial_state, safetensors_repo_files, tiny_gguf

FAST = TransferOptions(backoff=0.02, max_backoff=0.2, stall_timeout=0.5, connect_timeout=2, checkpoint_interval=0.05)
ST_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def ggufs() -> dict[str, bytes]:
    return {
        "model-Q4_K_M.gguf": tiny_gguf("Q4_K_M", seed=1),
        "model-Q4_K.gguf": tiny_gguf("Q4_K", seed=2),
        "model-Q8_0.gguf": tiny_gguf("Q8_0", 60_000, seed=3),  # ~240 kB: room for faults mid-file
        "README.md": b"# tiny\n",
    }


@pytest.fixture(scope="module")
def big_gguf() -> bytes:
    return tiny_gguf("big", 1_000_000, seed=5)  # ~4 MB


@pytest.fixture
def hub(ggufs: dict[str, bytes]):
    with FakeHub() as h:
        for kind in ("hf", "modelscope"):
            h.add_repo(kind, "test/tiny-GGUF", ggufs)
            h.add_repo(kind, "test/tiny", safetensors_repo_files())
        yield h


@pytest.fixture
def config(hub: FakeHub) -> SourceConfig:
    return SourceConfig(endpoints=endpoints(hub.hf_endpoint, hub.mirror_endpoint, hub.modelscope_endpoint),
                        list_timeout=5)


def endpoints(hf: str, mirror: str, modelscope: str) -> dict[Source, str]:
    return {"hf": hf, "hf-mirror": mirror, "modelscope": modelscope}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def run_pull(store: Store, reference: str, config: SourceConfig, **kwargs: Any) -> tuple[Any, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    kwargs.setdefault("transfer", FAST)
    manifest = asyncio.run(pull(store, reference, sources=config, progress=events.append, **kwargs))
    return manifest, events


def blob_sha256(store: Store, digest: str) -> str:
    return hashlib.sha256(store.blob_path(digest).read_bytes()).hexdigest()


def check_events(events: list[dict[str, Any]], sizes: dict[str, int]) -> None:
    """The stream looks like Ollama's /api/pull and ends each file at completed == total."""
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    last: dict[str, dict[str, Any]] = {}
    for e in events:
        if "digest" in e:
            assert e["status"] == f"pulling {e['digest'][7:19]}" and e["digest"].startswith("sha256:")
            assert 0 <= e["completed"] <= e["total"]
            last[e["digest"]] = e
    assert {d: e["total"] for d, e in last.items()} == sizes
    assert all(e["completed"] == e["total"] for e in last.values())


# -- each source, each format --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["hf.co/test/tiny-GGUF:Q8_0", "hf-mirror.com/test/tiny-GGUF:q8_0",
                                       "modelscope.cn/test/tiny-GGUF:Q8_0", "ms:test/tiny-GGUF:Q8_0"])
def test_pull_gguf_from_each_source(hub: FakeHub, config: SourceConfig, store: Store, ggufs: dict[str, bytes],
                                    reference: str) -> None:
    manifest, events = run_pull(store, reference, config)
    expected = hashlib.sha256(ggufs["model-Q8_0.gguf"]).hexdigest()
    assert manifest.name == reference.replace("ms:", "modelscope.cn/")
    assert manifest.format == "gguf"
    assert [(f.path, f.digest) for f in manifest.files] == [("model-Q8_0.gguf", f"sha256:{expected}")]
    assert blob_sha256(store, f"sha256:{expected}") == expected
    source = {"hf.co": "hf", "hf-mirror.com": "hf-mirror"}.get(reference.split("/")[0], "modelscope")
    assert manifest.source["hub"] == source and manifest.source["repo"] == "test/tiny-GGUF"
    assert manifest.source["files"] == ["model-Q8_0.gguf"]
    if source != "modelscope":
        assert manifest.source["commit"] == hub.repos[("hf", "test/tiny-GGUF")].commit
    prefix = {"hf": "hf", "hf-mirror": "mirror", "modelscope": "ms"}[source]
    assert hub.bytes_served("model-Q8_0.gguf", prefix) == len(ggufs["model-Q8_0.gguf"])
    assert hub.bytes_served("model-Q4_K_M.gguf") == 0
    check_events(events, {f"sha256:{expected}": len(ggufs["model-Q8_0.gguf"])})
    assert [m.name for m in store.list()] == [manifest.name]


def test_a_vision_model_comes_with_its_projector(hub: FakeHub, config: SourceConfig, store: Store,
                                                 ggufs: dict[str, bytes]) -> None:
    """A GGUF vision repo: the picked quantization and one projector (the F16 one), so the model can see."""
    projectors = {"mmproj-model-f16.gguf": tiny_gguf("mmproj", seed=4),
                  "mmproj-model-Q8_0.gguf": tiny_gguf("p8", seed=6)}
    hub.add_repo("hf", "test/vision-GGUF", {**ggufs, **projectors})
    manifest, _ = run_pull(store, "hf.co/test/vision-GGUF:Q8_0", config)
    assert [f.path for f in manifest.files] == ["mmproj-model-f16.gguf", "model-Q8_0.gguf"]
    assert hub.bytes_served("mmproj-model-Q8_0.gguf") == 0
    assert manifest.capabilities == ["completion", "vision"]
    projector = store.projector_path(manifest)
    assert projector is not None and projector.read_bytes() == projectors["mmproj-model-f16.gguf"]
    assert store.model_path(manifest).read_bytes() == ggufs["model-Q8_0.gguf"]
    text_only, _ = run_pull(store, "hf.co/test/tiny-GGUF:Q8_0", config)
    assert text_only.capabilities == ["completion"] and store.projector_path(text_only) is None
    assert manifest.model_info == text_only.model_info  # read from the model's file, not the projector's


def test_default_quant_and_latest_name(config: SourceConfig, store: Store) -> None:
    manifest, _ = run_pull(store, "hf.co/test/tiny-GGUF", config)
    assert manifest.name == "hf.co/test/tiny-GGUF:latest" and manifest.files[0].path == "model-Q4_K_M.gguf"
    assert manifest.source["quantization"] == "Q4_K_M"


@pytest.mark.parametrize(("reference", "listing"), [
    ("hf.co/test/tiny", "huggingface_hub"), ("hf-mirror.com/test/tiny", "huggingface_hub"),
    ("modelscope.cn/test/tiny", "modelscope client"), ("modelscope.cn/test/tiny", "httpx fallback"),
])
def test_pull_safetensors_from_each_source(hub: FakeHub, config: SourceConfig, store: Store, reference: str,
                                           listing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if listing == "httpx fallback":  # what runs where modelscope_hub is not installed
        monkeypatch.setattr(sources_module, "_modelscope_entries", sources_module._modelscope_entries_httpx)
    manifest, events = run_pull(store, reference, config)
    repo_files = safetensors_repo_files()
    assert manifest.format == "safetensors"
    assert {f.path for f in manifest.files} == ST_FILES
    for f in manifest.files:  # small HF files were checked against their git blob sha1, the rest by sha256
        assert f.digest == "sha256:" + hashlib.sha256(repo_files[f.path]).hexdigest()
    for skipped in ("pytorch_model.bin", "onnx/model.onnx", "original/consolidated.00.pth", "README.md"):
        assert hub.bytes_served(skipped) == 0
    check_events(events, {f.digest: f.size for f in manifest.files})
    assert manifest.details["format"] == "safetensors" and manifest.template == "{{ messages }}"


def test_listing_follows_link_pagination(ggufs: dict[str, bytes], store: Store) -> None:
    with FakeHub(page_size=2) as hub:
        hub.add_repo("hf", "test/tiny", safetensors_repo_files())
        config = SourceConfig(endpoints={"hf": hub.hf_endpoint})
        manifest, _ = run_pull(store, "hf.co/test/tiny", config)
        assert {f.path for f in manifest.files} == ST_FILES
        assert sum("cursor=" in path for _, path in hub.requests) >= 3


def test_revision_pin(hub: FakeHub, config: SourceConfig, store: Store) -> None:
    commit = hub.repos[("hf", "test/tiny-GGUF")].commit
    manifest, _ = run_pull(store, f"hf.co/test/tiny-GGUF:Q4_K@{commit}", config)
    assert manifest.name == "hf.co/test/tiny-GGUF:Q4_K" and manifest.files[0].path == "model-Q4_K.gguf"
    assert manifest.source["revision"] == commit
    with pytest.raises(RepoNotFound, match="has no revision 'nope'"):
        run_pull(store, "hf.co/test/tiny-GGUF@nope", config)


# -- errors and fallback ---------------------------------------------------------------------------------------------
CATALOG = Catalog.from_toml(textwrap.dedent("""
    [latest]
    "tiny" = "1m"
    [models."tiny:1m"]
    gguf = { hf = "test/tiny-GGUF", modelscope = "test/tiny-GGUF" }
    safetensors = { hf = "test/tiny", modelscope = "test/tiny" }
    [models."ghost:1m"]
    gguf = { hf = "test/ghost-GGUF", modelscope = "test/ghost-GGUF" }
"""))


def test_short_name_falls_back_to_the_next_source(hub: FakeHub, config: SourceConfig, store: Store) -> None:
    dead = dead_endpoint()
    only_ms = SourceConfig(endpoints=endpoints(dead, dead, hub.modelscope_endpoint))
    manifest, events = run_pull(store, "tiny:1m-q8_0", only_ms, catalog=CATALOG)
    assert manifest.name == "tiny:1m-q8_0" and manifest.source["hub"] == "modelscope"
    assert hub.bytes_served("model-Q8_0.gguf", "ms") > 0 and hub.bytes_served("model-Q8_0.gguf", "hf") == 0
    notes = [e["status"] for e in events if "trying" in e["status"]]
    assert len(notes) == 2 and "hf (" in notes[0] and "unreachable" in notes[0] and "trying hf-mirror" in notes[0]
    assert any(e.get("source") == "modelscope" for e in events)

    mirror = SourceConfig(endpoints=endpoints(dead, hub.mirror_endpoint, dead))
    manifest, _ = run_pull(store, "tiny", mirror, catalog=CATALOG, prefer="safetensors")
    assert manifest.name == "tiny:latest" and manifest.format == "safetensors" and manifest.source["hub"] == "hf-mirror"


def test_unreachable_and_missing_repos_say_where_they_looked(config: SourceConfig, store: Store) -> None:
    dead = dead_endpoint()
    with pytest.raises(SourceUnreachable, match="unreachable"):
        run_pull(store, "hf.co/test/tiny-GGUF", SourceConfig(endpoints={"hf": dead}))
    with pytest.raises(RepoNotFound) as info:
        run_pull(store, "ghost:1m", config, catalog=CATALOG)
    message = str(info.value)
    assert "not found on any source" in message
    for where in ("hf (", "hf-mirror (", "modelscope ("):
        assert where in message
    with pytest.raises(RepoNotFound, match=r"test/nothing was not found on hf \(http"):
        run_pull(store, "hf.co/test/nothing", config)
    with pytest.raises(TagNotFound, match=r"it has Q4_K, Q4_K_M, Q8_0$"):
        run_pull(store, "hf.co/test/tiny-GGUF:Q3_K_S", config)
    assert store.list() == []


def test_gated_and_private_repos_ask_for_a_token(hub: FakeHub, config: SourceConfig, store: Store,
                                                 ggufs: dict[str, bytes]) -> None:
    hub.add_repo("hf", "test/gated-GGUF", ggufs, gated=True, token="hf_secret")
    hub.add_repo("hf", "test/private-GGUF", ggufs, private=True, token="hf_secret")
    hub.add_repo("modelscope", "test/private-GGUF", ggufs, private=True, token="ms_secret")
    with pytest.raises(AccessDenied) as info:
        run_pull(store, "hf.co/test/gated-GGUF", config)
    assert "restricted" in str(info.value) and "HF_TOKEN" in str(info.value)
    with pytest.raises(AccessDenied, match="not in the authorized list"):
        run_pull(store, "hf.co/test/gated-GGUF",
                 SourceConfig(endpoints={"hf": hub.hf_endpoint}, tokens={"hf": "wrong"}))
    with pytest.raises(AccessDenied, match="HF_TOKEN"):
        run_pull(store, "hf.co/test/private-GGUF", config)
    with pytest.raises(AccessDenied, match="MGR_MODELSCOPE_TOKEN"):
        run_pull(store, "ms:test/private-GGUF", config)
    with_token = SourceConfig(endpoints={"hf": hub.hf_endpoint}, tokens={"hf": "hf_secret"})
    manifest, _ = run_pull(store, "hf.co/test/gated-GGUF", with_token)
    assert manifest.files[0].path == "model-Q4_K_M.gguf"
    manifest, _ = run_pull(store, "ms:test/private-GGUF:Q4_K",
                           SourceConfig(endpoints={"modelscope": hub.modelscope_endpoint},
                                        tokens={"modelscope": "ms_secret"}))
    assert manifest.files[0].path == "model-Q4_K.gguf"


# -- faults ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "extra_bytes"),
    [
        ({"kind": "drop", "after": 50_000}, 0),  # the bytes before the drop are kept
        ({"kind": "status", "status": 500}, 0),
        ({"kind": "status", "status": 503, "times": 2}, 0),
        ({"kind": "stall", "after": 50_000, "seconds": 3}, 0),
        ({"kind": "corrupt", "offset": 123_456}, None),  # detected by the sha256, the file fetched once more
    ],
    ids=["drop", "500", "503x2", "stall", "corrupt"],
)
@pytest.mark.parametrize("reference", ["hf.co/test/tiny-GGUF:Q8_0", "ms:test/tiny-GGUF:Q8_0"])
def test_faults_are_survived(hub: FakeHub, config: SourceConfig, store: Store, ggufs: dict[str, bytes],
                             reference: str, fault: dict[str, Any], extra_bytes: int | None) -> None:
    hub.fail("model-Q8_0.gguf", **fault)
    started = time.monotonic()
    manifest, _ = run_pull(store, reference, config)
    size = len(ggufs["model-Q8_0.gguf"])
    assert blob_sha256(store, manifest.files[0].digest) == hashlib.sha256(ggufs["model-Q8_0.gguf"]).hexdigest()
    served = hub.bytes_served("model-Q8_0.gguf")
    assert served == (size * 2 if extra_bytes is None else size + extra_bytes)
    assert time.monotonic() - started < 3  # a stall costs the stall timeout (0.5 s), not the stall (3 s)
    assert all(f.times == 0 for f in hub.faults)


def test_429_honours_retry_after(hub: FakeHub, config: SourceConfig, store: Store) -> None:
    hub.fail("model-Q8_0.gguf", kind="status", status=429, retry_after="1")
    started = time.monotonic()
    run_pull(store, "hf.co/test/tiny-GGUF:Q8_0", config)
    assert time.monotonic() - started >= 0.95


def test_a_file_corrupted_twice_fails_loudly_and_nothing_is_visible(hub: FakeHub, config: SourceConfig,
                                                                     store: Store) -> None:
    hub.fail("model-Q8_0.gguf", kind="corrupt", offset=10, times=2)
    with pytest.raises(ChecksumMismatch, match="failed verification twice"):
        run_pull(store, "hf.co/test/tiny-GGUF:Q8_0", config)
    assert store.list() == []
    assert list(store.blobs_dir.iterdir()) == []
    assert not [p for p in store.tmp_dir.iterdir() if p.suffix == ".partial"]


def test_files_that_are_not_a_model_leave_nothing_behind(hub: FakeHub, config: SourceConfig, store: Store) -> None:
    hub.add_repo("hf", "test/broken-GGUF", {"model-Q4_K_M.gguf": b"GGUF but not really" * 10})
    with pytest.raises(InvalidModel):
        run_pull(store, "hf.co/test/broken-GGUF", config)
    assert store.list() == [] and list(store.blobs_dir.iterdir()) == []


def test_disk_full_is_clear_and_keeps_the_partial(hub: FakeHub, config: SourceConfig, store: Store,
                                                   ggufs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = transfer_module._PartialFile.write
    writes = {"n": 0}

    def write(self: Any, offset: int, data: bytes) -> None:
        if writes["n"] >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes["n"] += 1
        real_write(self, offset, data)

    monkeypatch.setattr(transfer_module._PartialFile, "write", write)
    monkeypatch.setattr(transfer_module, "_WRITE_BUFFER", 64 * 1024)
    with pytest.raises(DiskFull, match="free some space and pull again"):
        run_pull(store, "hf.co/test/tiny-GGUF:Q8_0", config)
    assert store.list() == []
    digest = hashlib.sha256(ggufs["model-Q8_0.gguf"]).hexdigest()
    state = partial_state(store, digest)
    assert state is not None and (store.tmp_dir / f"{digest}.partial").exists()
    kept = sum(done for _, _, done in state["parts"])
    assert kept > 0
    monkeypatch.setattr(transfer_module._PartialFile, "write", real_write)
    hub.reset_counters()
    run_pull(store, "hf.co/test/tiny-GGUF:Q8_0", config)
    assert hub.bytes_served("model-Q8_0.gguf") == len(ggufs["model-Q8_0.gguf"]) - kept


# -- resume, sharing, dedupe ------------------------------------------------------------------------------------------
RESUMABLE = TransferOptions(part_size=1 << 20, connections=2, backoff=0.02, stall_timeout=2, checkpoint_interval=0.05)


def test_resume_after_the_pull_is_cancelled(hub: FakeHub, config: SourceConfig, store: Store, big_gguf: bytes) -> None:
    hub.add_repo("hf", "test/big-GGUF", {"big-Q4_K_M.gguf": big_gguf})
    hub.throttle("big-Q4_K_M.gguf", 2_000_000)
    digest = hashlib.sha256(big_gguf).hexdigest()

    async def cancel_midway() -> None:
        task = asyncio.create_task(pull(store, "hf.co/test/big-GGUF", sources=config, transfer=RESUMABLE))
        while hub.bytes_served("big-Q4_K_M.gguf") < len(big_gguf) * 0.4:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert store.list() == []
    state = partial_state(store, digest)
    assert state is not None
    kept = sum(done for _, _, done in state["parts"])
    assert len(big_gguf) * 0.3 < kept < len(big_gguf)
    hub.throttle("big-Q4_K_M.gguf", None)
    hub.wait_idle()
    hub.reset_counters()
    manifest, events = run_pull(store, "hf.co/test/big-GGUF", config, transfer=RESUMABLE)
    assert hub.bytes_served("big-Q4_K_M.gguf") == len(big_gguf) - kept
    assert manifest.files[0].digest == f"sha256:{digest}" and blob_sha256(store, manifest.files[0].digest) == digest
    first = next(e for e in events if "digest" in e)
    assert first["completed"] >= kept  # progress starts where the last pull stopped, not at 0
    assert not list(store.tmp_dir.iterdir())  # partial, state and lock are gone


def test_resume_after_kill_9(hub: FakeHub, config: SourceConfig, store: Store, big_gguf: bytes, tmp_path: Path) -> None:
    hub.add_repo("hf", "test/big-GGUF", {"big-Q4_K_M.gguf": big_gguf})
    hub.throttle("big-Q4_K_M.gguf", 1_000_000)
    digest = hashlib.sha256(big_gguf).hexdigest()
    script = tmp_path / "puller.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from mgr.registry.pull import pull
        from mgr.registry.hubs import SourceConfig
        from mgr.registry.store import Store
        from mgr.registry.transfer import TransferOptions
        options = TransferOptions(part_size={RESUMABLE.part_size}, connections=2, checkpoint_interval=0.05)
        asyncio.run(pull(Store(Path(sys.argv[1])), "hf.co/test/big-GGUF",
                         sources=SourceConfig(endpoints={{"hf": sys.argv[2]}}), transfer=options))
    """))
    child = subprocess.Popen([sys.executable, str(script), str(store.root), hub.hf_endpoint])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = partial_state(store, digest)
            if state and sum(d for _, _, d in state["parts"]) > len(big_gguf) * 0.3:
                break
            assert child.poll() is None, "the pull finished or died before it could be killed"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert store.list() == []
    state = partial_state(store, digest)
    assert state is not None
    kept = sum(done for _, _, done in state["parts"])
    assert 0 < kept < len(big_gguf)
    hub.throttle("big-Q4_K_M.gguf", None)
    hub.wait_idle()
    hub.reset_counters()
    manifest, _ = run_pull(store, "hf.co/test/big-GGUF", config, transfer=RESUMABLE)
    # Exactly the bytes the state did not record as durable are fetched again: nothing it had.
    assert hub.bytes_served("big-Q4_K_M.gguf") == len(big_gguf) - kept
    assert blob_sha256(store, manifest.files[0].digest) == digest


def test_two_concurrent_pulls_share_one_download(hub: FakeHub, config: SourceConfig, store: Store,
                                                 big_gguf: bytes) -> None:
    hub.add_repo("hf", "test/big-GGUF", {"big-Q4_K_M.gguf": big_gguf})
    hub.add_repo("modelscope", "test/big-GGUF", {"big-Q4_K_M.gguf": big_gguf})
    hub.throttle("big-Q4_K_M.gguf", 4_000_000)

    async def both() -> tuple[Any, Any, list[dict[str, Any]], list[dict[str, Any]]]:
        a_events: list[dict[str, Any]] = []
        b_events: list[dict[str, Any]] = []
        async with Downloader(store, RESUMABLE) as downloader:
            a, b = await asyncio.gather(
                pull(store, "hf.co/test/big-GGUF", sources=config, downloader=downloader, progress=a_events.append),
                pull(store, "ms:test/big-GGUF:Q4_K_M", sources=config, downloader=downloader, progress=b_events.append),
            )
        return a, b, a_events, b_events

    a, b, a_events, b_events = asyncio.run(both())
    assert hub.bytes_served("big-Q4_K_M.gguf") == len(big_gguf)
    assert a.files[0].digest == b.files[0].digest
    assert {m.name for m in store.list()} == {"hf.co/test/big-GGUF:latest", "modelscope.cn/test/big-GGUF:Q4_K_M"}
    for events in (a_events, b_events):  # both see the shared download's progress
        progress = [e["completed"] for e in events if "digest" in e]
        assert progress[-1] == len(big_gguf) and len(progress) >= 2


def test_separate_downloaders_wait_for_each_other(hub: FakeHub, config: SourceConfig, store: Store,
                                                  big_gguf: bytes) -> None:
    """Two downloaders on one store (two processes, in effect) serialise on the file lock: fetched once."""
    hub.add_repo("hf", "test/big-GGUF", {"big-Q4_K_M.gguf": big_gguf})
    hub.throttle("big-Q4_K_M.gguf", 8_000_000)

    async def both() -> None:
        await asyncio.gather(*(pull(store, f"hf.co/test/big-GGUF:{tag}", sources=config, transfer=RESUMABLE)
                               for tag in ("latest", "Q4_K_M")))

    asyncio.run(both())
    assert hub.bytes_served("big-Q4_K_M.gguf") == len(big_gguf)
    assert len(store.list()) == 2 and not list(store.tmp_dir.iterdir())


def test_blobs_in_the_store_are_not_fetched_again(hub: FakeHub, config: SourceConfig, store: Store) -> None:
    run_pull(store, "hf.co/test/tiny", config)
    hub.reset_counters()
    manifest, _ = run_pull(store, "modelscope.cn/test/tiny", config)  # same files, another hub
    assert sum(hub.served.values()) == 0
    assert {f.path for f in manifest.files} == ST_FILES
    assert len(store.list()) == 2


# -- planned, then fetched -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("reference", "error", "status"), [
    ("hf.co/../../etc", InvalidReference, 400),
    ("hf.co/test/nothing", RepoNotFound, 404),
    ("ghost:1m", RepoNotFound, 404),
    ("nosuchmodel:7b", UnknownModel, 404),
    ("hf.co/test/tiny-GGUF:Q2_K", TagNotFound, 404),
    ("hf.co/test/gated-GGUF", AccessDenied, 403),
    ("hf.co/test/weights-in-bin", NoModelFiles, 422),
])
def test_plan_raises_every_4xx_before_anything_downloads(hub: FakeHub, config: SourceConfig, store: Store,
                                                         ggufs: dict[str, bytes], reference: str,
                                                         error: type[PullError], status: int) -> None:
    hub.add_repo("hf", "test/gated-GGUF", ggufs, gated=True, token="hf_secret")
    hub.add_repo("hf", "test/weights-in-bin", {"config.json": b"{}", "pytorch_model.bin": b"\x80" * 2000})
    events: list[PullEvent] = []
    with pytest.raises(error) as info:
        asyncio.run(plan_pull(store, reference, sources=config, catalog=CATALOG, progress=events.append))
    assert info.value.status == status
    assert events[0] == {"status": "pulling manifest"} and not any("digest" in e for e in events)
    assert sum(hub.served.values()) == 0  # not one byte of a file
    assert not any(store.tmp_dir.iterdir()) and store.list() == []


def statuses(events: list[PullEvent]) -> list[str]:
    """The stream with each file's progress folded into one entry per file (their timing varies)."""
    out: list[str] = []
    for e in events:
        entry = f"file {e['digest']} {e['total']}" if "digest" in e else e["status"]
        if not out or out[-1] != entry:
            out.append(entry)
    return out


def test_planned_events_are_the_stream_of_a_plain_pull(hub: FakeHub, tmp_path: Path) -> None:
    """A plan's events are what `pull(progress=...)` reports, in the same order and shapes, fallback notes of the
    planning included; the plan itself says what will be fetched."""
    dead = dead_endpoint()
    only_ms = SourceConfig(endpoints=endpoints(dead, dead, hub.modelscope_endpoint))
    streamed: list[PullEvent] = []
    reported: list[PullEvent] = []

    async def planned_then_streamed() -> PullPlan:
        plan = await plan_pull(Store(tmp_path / "a"), "tiny:1m-q8_0", sources=only_ms, catalog=CATALOG)
        async for event in plan.events(transfer=FAST):
            streamed.append(event)
        return plan

    plan = asyncio.run(planned_then_streamed())
    asyncio.run(pull(Store(tmp_path / "b"), "tiny:1m-q8_0", sources=only_ms, catalog=CATALOG,
                     progress=reported.append, transfer=FAST))
    assert plan.name == "tiny:1m-q8_0" and plan.listing.source == "modelscope"
    assert plan.selection.format == "gguf" and [f.path for f in plan.selection.files] == ["model-Q8_0.gguf"]
    assert list(plan.planned) == streamed[:len(plan.planned)] == reported[:len(plan.planned)]
    assert statuses(streamed) == statuses(reported)
    shape = statuses(streamed)
    assert shape[0] == "pulling manifest" and len([s for s in shape if "; trying " in s]) == 2
    assert shape[3].startswith("pulling from modelscope (") and shape[4].startswith("file sha256:")
    assert shape[5:] == ["verifying sha256 digest", "writing manifest", "success"]
    source = next(e for e in streamed if "source" in e)
    assert source == {"status": source["status"], "source": "modelscope", "repo": "test/tiny-GGUF", "commit": None}
    check_events(streamed, {f"sha256:{plan.selection.files[0].sha256}": plan.selection.files[0].size})


def test_a_fetch_error_comes_after_the_events(hub: FakeHub, config: SourceConfig, store: Store) -> None:
    hub.fail("model-Q8_0.gguf", kind="corrupt", offset=10, times=2)
    events: list[PullEvent] = []
    plans: list[PullPlan] = []

    async def stream() -> None:
        plans.append(await plan_pull(store, "hf.co/test/tiny-GGUF:Q8_0", sources=config))
        async for event in plans[0].events(transfer=FAST):
            events.append(event)

    with pytest.raises(ChecksumMismatch) as info:
        asyncio.run(stream())
    assert info.value.status == 502
    assert tuple(events[:len(plans[0].planned)]) == plans[0].planned
    assert not {"verifying sha256 digest", "success"} & {e["status"] for e in events} and store.list() == []


def test_closing_the_events_stops_the_download_and_keeps_it_resumable(hub: FakeHub, config: SourceConfig,
                                                                      store: Store, big_gguf: bytes) -> None:
    hub.add_repo("hf", "test/big-GGUF", {"big-Q4_K_M.gguf": big_gguf})
    hub.throttle("big-Q4_K_M.gguf", 2_000_000)
    digest = hashlib.sha256(big_gguf).hexdigest()

    async def leave_midway() -> None:
        async with Downloader(store, RESUMABLE) as downloader:
            plan = await plan_pull(store, "hf.co/test/big-GGUF", sources=config)
            events = plan.events(downloader)
            async for event in events:
                if "digest" in event and event["completed"] > len(big_gguf) * 0.4:
                    break
            await events.aclose()  # what a client that hangs up does
            assert not downloader._flights  # the download was cancelled, not left running

    asyncio.run(leave_midway())
    assert store.list() == []
    state = partial_state(store, digest)
    assert state is not None
    kept = sum(done for _, _, done in state["parts"])
    assert len(big_gguf) * 0.3 < kept < len(big_gguf)
    hub.throttle("big-Q4_K_M.gguf", None)
    hub.wait_idle()
    hub.reset_counters()
    manifest, _ = run_pull(store, "hf.co/test/big-GGUF", config, transfer=RESUMABLE)
    assert hub.bytes_served("big-Q4_K_M.gguf") == len(big_gguf) - kept
    assert blob_sha256(store, manifest.files[0].digest) == digest


def test_real_gguf_end_to_end(hub: FakeHub, config: SourceConfig, store: Store, gguf_path: Path) -> None:
    hub.add_repo("hf", "test/SmolLM2-135M-Instruct-GGUF",
                 {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf_path, "SmolLM2-135M-Instruct.Q8_0.gguf": b"x" * 2000})
    options = TransferOptions(part_size=16 << 20, connections=4)
    manifest, events = run_pull(store, "hf.co/test/SmolLM2-135M-Instruct-GGUF:Q4_1", config, transfer=options)
    size = gguf_path.stat().st_size
    assert manifest.files[0].size == size and hub.bytes_served("SmolLM2-135M-Instruct.Q4_1.gguf") == size
    assert manifest.details["family"] == "llama" and manifest.details["quantization_level"] == "Q4_1"
    ranges = [path for method, path in hub.requests if "/cdn/" in path]
    assert len(ranges) == -(-size // (16 << 20))  # one Range request per part
    assert store.model_path(manifest).stat().st_size == size
    check_events(events, {manifest.files[0].digest: size})
    json.dumps(manifest.to_json())
