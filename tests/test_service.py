"""mgr as a systemd service: the unit passes `systemd-analyze verify` (and its security review), the files in
systemd/ are what `mgr service install` writes, install/uninstall print their steps (--dry-run changes
nothing), `mgr service status` finds the daemon from the settings, and the daemon speaks sd_notify: READY=1
once it answers, STOPPING=1 when SIGTERM starts its drain."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon

from mgr.cli import service
from mgr.registry.config import load_settings

REPO = Path(__file__).resolve().parent.parent
ANALYZE = shutil.which("systemd-analyze")


def needs_analyze(test: Callable[..., None]) -> Callable[..., None]:
    """The unit's checks need systemd-analyze: without it they fail saying how to get it (scripts/test.sh installs
    it where it can), never skip."""
    def checked(*args: Any, **kwargs: Any) -> None:
        assert ANALYZE is not None, "systemd-analyze is not installed: apt-get install systemd"
        test(*args, **kwargs)

    return functools.wraps(test)(checked)


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "HOME": str(tmp_path), "MGR_CONFIG": str(tmp_path / "config.toml"), **env}
    return subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=environment, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_the_repository_files_are_what_install_writes() -> None:
    assert (REPO / "systemd/mgr.service").read_text() == service.system_unit(service.DEFAULT_EXECUTABLE)
    assert (REPO / "systemd/mgr.sysusers.conf").read_text() == service.SYSUSERS


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as install writes it on this machine (its ExecStart must exist for verify), system and user."""
    program = service.executable().split()[0]
    system = tmp_path / "system" / "mgr.service"
    user = tmp_path / "user" / "mgr.service"
    for path, text in ((system, service.system_unit(service.executable())),
                       (user, service.user_unit(service.executable()))):
        path.parent.mkdir()
        path.write_text(text)
        result = subprocess.run([str(ANALYZE), "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and not result.stderr.strip(), (path, result.stderr)
    assert Path(program).exists()
    # the repository's unit differs only by its ExecStart (/opt/mgr/bin/mgr, absent here)
    assert (REPO / "systemd/mgr.service").read_text().replace(service.DEFAULT_EXECUTABLE, service.executable()) \
        == system.read_text()


@needs_analyze
def test_systemd_analyze_security(tmp_path: Path) -> None:
    unit = tmp_path / "mgr.service"
    unit.write_text(service.system_unit(service.executable()))
    result = subprocess.run([str(ANALYZE), "security", "--offline=true", str(unit)], capture_output=True, text=True,
                            timeout=60)
    found = re.search(r"Overall exposure level for mgr\.service: ([0-9.]+)", result.stdout)
    if found is None and "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no offline security review: {result.stderr.strip()}")
    assert found is not None, result.stdout + result.stderr
    exposure = float(found.group(1))
    assert exposure <= 4.0, result.stdout  # "OK" in systemd's words; the GPUs need device access, JIT, the network
    for line in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN"):
        assert any(row.lstrip().startswith("✓ " + line) for row in result.stdout.splitlines()), line


def test_install_dry_run(tmp_path: Path) -> None:
    result = cli(tmp_path, "service", "install", "--dry-run", MGR_SHUTDOWN_TIMEOUT="60")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = re.findall(r"^\[(\d)/7\] (.*)$", out, flags=re.M)
    assert [what for _, what in steps] == [
        "write /etc/sysusers.d/mgr.conf", "create the mgr user (in the video and render groups)",
        "write /etc/mgr/config.toml (kept if it exists)", "write /etc/mgr/mgr.env (kept if it exists)",
        "write /etc/systemd/system/mgr.service", "reload systemd's units", "enable and start mgr"]
    assert "    $ systemd-sysusers /etc/sysusers.d/mgr.conf" in out
    assert "    $ systemctl daemon-reload" in out
    assert "    $ systemctl enable --now mgr" in out
    assert f"    ExecStart={service.executable()} serve" in out
    assert "    TimeoutStopSec=95" in out  # MGR_SHUTDOWN_TIMEOUT 60 s + the runners' stop and the backstop
    assert '    models_dir = "/var/lib/mgr/models"' in out
    assert "    Type=notify" in out and "    StateDirectory=mgr" in out and "    u mgr - " in out
    assert out.rstrip().endswith("(dry run: nothing was changed)")


def test_install_user_dry_run_changes_nothing(tmp_path: Path) -> None:
    result = cli(tmp_path, "service", "install", "--user", "--dry-run")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / ".config/systemd/user/mgr.service"
    assert f"[1/3] write {unit}" in result.stdout
    assert "    $ systemctl --user daemon-reload" in result.stdout
    assert "    $ systemctl --user enable --now mgr" in result.stdout
    assert "    WantedBy=default.target" in result.stdout and "User=mgr" not in result.stdout
    assert not unit.exists() and not (tmp_path / ".config").exists()

    removed = cli(tmp_path, "service", "uninstall", "--user", "--dry-run")
    assert removed.returncode == 0, removed.stderr
    assert "$ systemctl --user disable --now mgr" in removed.stdout and f"remove {unit}" in removed.stdout


def test_install_user_writes_the_unit_then_runs_systemctl(tmp_path: Path) -> None:
    """A real install into a home folder, with a stand-in `systemctl` on PATH that records what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    result = cli(tmp_path, "service", "install", "--user", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / ".config/systemd/user/mgr.service"
    assert unit.read_text() == service.user_unit(service.executable(), service.stop_timeout(10.0))
    assert calls.read_text().splitlines() == ["--user daemon-reload", "--user enable --now mgr"]
    assert "mgr is installed and running" in result.stdout

    removed = cli(tmp_path, "service", "uninstall", "--user", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists()
    assert calls.read_text().splitlines()[2:] == ["--user disable --now mgr", "--user daemon-reload"]


def test_a_system_install_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(service.ServiceError, match="needs root: run it with sudo"):
        service.install(user=False, dry_run=False)


def test_status_finds_the_daemon_from_the_settings(daemon: Daemon, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'host = "127.0.0.1:{daemon.port}"\nmodels_dir = "{tmp_path}/models"\n')
    up = cli(tmp_path, "service", "status", MGR_CONFIG=str(config))
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"daemon: http://127.0.0.1:{daemon.port} (answers)" in up.stdout
    assert f"models: {tmp_path}/models" in up.stdout and f"settings: {config}" in up.stdout

    config.write_text(f'host = "127.0.0.1:{_free_port()}"\n')
    down = cli(tmp_path, "service", "status", MGR_CONFIG=str(config))
    assert down.returncode == 3 and "(does not answer)" in down.stdout


def test_the_cli_reads_the_system_config_when_the_user_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """What lets every user's `mgr` find the service's daemon and store without flags."""
    system = tmp_path / "etc-mgr-config.toml"
    system.write_text(service.system_config("127.0.0.1:12345"))
    monkeypatch.setattr("mgr.registry.config.SYSTEM_CONFIG", system)
    monkeypatch.setattr("platformdirs.user_config_dir", lambda *_: str(tmp_path / "no-user-config"))
    settings = load_settings(env={})
    assert settings.base_url == "http://127.0.0.1:12345"
    assert settings.models_dir == Path("/var/lib/mgr/models")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_sd_notify_ready_then_stopping(tmp_path: Path) -> None:
    """The daemon under a stand-in for systemd: a datagram socket at $NOTIFY_SOCKET."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(60)
        daemon = Daemon(tmp_path, {"NOTIFY_SOCKET": address})
        process = subprocess.Popen([sys.executable, "-m", "mgr.cli", "serve"], env=daemon.env,
                                   stdout=daemon.log_path.open("ab"), stderr=subprocess.STDOUT)
        try:
            assert listener.recv(4096) == b"READY=1"
            # READY comes once it listens: it answers at once, no retry needed
            assert httpx.get(daemon.base_url + "/", timeout=5).status_code == 200
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert listener.recv(4096) == b"STOPPING=1"
            assert time.monotonic() - started < 5
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
