"""The shape the code keeps (issue 10), checked on the source so that it stays true: no class in daemon/
over 350 lines; API handlers call the typed runner client and never build a runner URL; one builder of
OpenAI error bodies; the runner protocol and the configuration are leaves; the CLI never imports the daemon."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources(folder: str) -> dict[Path, str]:
    return {p: p.read_text() for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_class_in_the_daemon_is_over_350_lines() -> None:
    sizes = {}
    for path, source in _sources("daemon").items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.relative_to(ROOT)}:{node.name}"] = (node.end_lineno or 0) - node.lineno + 1
    assert sizes, "no classes found"
    assert {name: n for name, n in sizes.items() if n > 350} == {}


def test_handlers_never_build_runner_urls() -> None:
    for path, source in _sources("daemon/api").items():
        assert "base_url" not in source, path
        assert "http://" not in source, path
        assert "/v1/chat/completions\"" not in source, path  # paths come from protocol.shapes


def test_one_builder_of_openai_error_bodies() -> None:
    builders = [path.relative_to(ROOT).as_posix() for folder in ("daemon", "tests/standin", "tests/bench")
                for path, source in _sources(folder).items() if re.search(r"[\"']param[\"']\s*:", source)]
    assert builders == ["daemon/protocol/errors.py"]


def test_protocol_and_configuration_are_leaves() -> None:
    for path, source in _sources("daemon/protocol").items():
        outside = {name for name in _imports(source) if name.startswith("..") or name.startswith("mgr")}
        assert outside == set(), f"{path} imports {outside}"
    for name in ("config.py", "hubs.py"):
        imported = _imports((ROOT / "registry" / name).read_text())
        assert {n for n in imported if n.startswith(".") or n.startswith("mgr")} <= {".hubs"}, name


def _module_level_imports(source: str) -> set[str]:
    body = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return _imports(ast.unparse(ast.Module(body=body, type_ignores=[])))


def test_the_cli_and_the_registry_never_import_the_daemon() -> None:
    """The registry never; the CLI only inside `mgr serve`, so that every other command starts fast."""
    for folder in ("cli", "registry"):
        for path, source in _sources(folder).items():
            imported = _imports(source) if folder == "registry" else _module_level_imports(source)
            assert not any(name.startswith("mgr.daemon") for name in imported), path
