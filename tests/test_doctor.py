"""`mgr doctor` against the real daemon and this installation's real llama-cpp-python (a CPU build here), and
the ggml backend detection over library folders laid out as CUDA and CPU builds of llama-cpp-python ship them."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import pytest
from conftest import Daemon

from mgr.daemon import backends


def test_doctor_reports_the_engines_the_gpus_and_the_store(daemon: Daemon, smollm2: str) -> None:
    done = daemon.cli("doctor")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert "answers at" in lines["daemon"] and "mgr " in lines["daemon"]
    assert "llama-cpp-python 0.3" in lines["llama.cpp"] and "backends: CPU" in lines["llama.cpp"]
    assert lines["vLLM"].startswith("vLLM        not installed") and "pip install 'mgr[vllm]'" in lines["vLLM"]
    assert "none that NVML sees" in lines["GPUs"]
    assert str(daemon.env["MGR_MODELS"]) in lines["store"] and "1 models" in lines["store"]


def test_doctor_says_when_the_daemon_is_down(tmp_path: Path) -> None:
    down = Daemon(tmp_path)  # never started: nothing listens on its port
    done = down.cli("doctor")
    assert done.returncode == 0 and f"not answering at {down.base_url}" in done.stdout


@pytest.mark.parametrize(("files", "expected"), [
    (["libggml-base.so", "libggml-cpu.so", "libggml-cuda.so", "libllama.so"], ["CPU", "CUDA"]),
    (["libggml-base.so.0", "libggml-cpu.so.0.25.3"], ["CPU"]),
    (["libggml-vulkan.so", "libggml-cpu.so"], ["CPU", "Vulkan"]),
])
def test_ggml_backends_are_read_from_the_library_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        files: list[str], expected: list[str]) -> None:
    package = tmp_path / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in files:
        (package / "lib" / name).write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("llama_cpp", None, origin=str(package / "__init__.py"))
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: spec)
    assert backends.llama_cpp()["backends"] == expected
