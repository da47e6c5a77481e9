"""`mgr service install|uninstall|status`: mgr as a systemd service, for the machine (a dedicated `mgr` user,
models in /var/lib/mgr) or for one user (`--user`: a user unit, models where `mgr serve` keeps them).

The unit's text lives here, the one source: `systemd/mgr.service` and `systemd/mgr.sysusers.conf` in the
repository are what `install` writes for the default path /opt/mgr/bin/mgr (tests/test_service.py checks they
match), for packagers who install the files themselves.

Install writes the files, then runs systemd-sysusers (the user), `systemctl daemon-reload` and
`systemctl enable --now mgr`, printing each step; `--dry-run` prints the same steps and files and changes
nothing. Stdlib only, like the rest of the CLI.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mgr.registry.config import SYSTEM_CONFIG, ConfigError, Settings, default_config_path, load_settings

SERVICE = "mgr"
DEFAULT_EXECUTABLE = "/opt/mgr/bin/mgr"
STATE = Path("/var/lib/mgr")
ENV_FILE = Path("/etc/mgr/mgr.env")
UNIT_PATH = Path("/etc/systemd/system/mgr.service")
SYSUSERS_PATH = Path("/etc/sysusers.d/mgr.conf")
# SIGTERM drains for MGR_SHUTDOWN_TIMEOUT (10 s), uvicorn's backstop adds 5 s, then runners get 10 s each (in
# parallel) between their SIGTERM and SIGKILL: TimeoutStopSec covers that with room to spare.
STOP_MARGIN_SECONDS = 35
MIN_STOP_SECONDS = 45


def stop_timeout(shutdown_timeout: float) -> int:
    return max(MIN_STOP_SECONDS, int(shutdown_timeout + 0.999) + STOP_MARGIN_SECONDS)


def system_unit(executable: str, stop_seconds: int = MIN_STOP_SECONDS, protect_home: str = "yes") -> str:
    return f"""\
# mgr as a system service (written by `mgr service install`; change it with `sudo systemctl edit mgr`).
# Models in /var/lib/mgr/models, runner logs in /var/lib/mgr/state; settings in /etc/mgr/config.toml and
# /etc/mgr/mgr.env (MGR_* variables); logs: journalctl -u mgr.
[Unit]
Description=mgr local model manager (Ollama-, OpenAI- and Anthropic-compatible API)
After=network-online.target
Wants=network-online.target
# a daemon that cannot start (a bad setting, its port taken) is retried 5 times a minute, then left failed
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
# READY=1 once it listens, STOPPING=1 when the drain begins (daemon/notify.py)
Type=notify
ExecStart={executable} serve
User=mgr
Group=mgr
# /var/lib/mgr, owned by mgr: the store and the state; also the user's home (sysusers), for the hubs' caches
StateDirectory=mgr
StateDirectoryMode=0750
Environment=MGR_CONFIG=/etc/mgr/config.toml
EnvironmentFile=-/etc/mgr/mgr.env
Restart=on-failure
RestartSec=3
# SIGTERM goes to the daemon only: it drains (MGR_SHUTDOWN_TIMEOUT, 10 s) and stops its runners itself. What is
# left after TimeoutStopSec (a runner stuck in a driver call) is killed with the whole cgroup. Raise it with
# MGR_SHUTDOWN_TIMEOUT: at least MGR_SHUTDOWN_TIMEOUT + {STOP_MARGIN_SECONDS} s.
KillMode=mixed
TimeoutStopSec={stop_seconds}

# The GPUs: NVIDIA's device nodes (nvidia0.., nvidiactl, nvidia-uvm, MIG's nvidia-caps, NVSwitch), DRM
# (/dev/dri) and InfiniBand verbs (NCCL between machines; RDMA CM also needs /dev/infiniband/rdma_cm: add it with
# `systemctl edit mgr`); the user is in the video and render groups (sysusers). A type this machine's kernel
# does not have is skipped.
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
DeviceAllow=char-nvidia-nvswitch rw
DeviceAllow=char-drm rw
DeviceAllow=char-infiniband_verbs rw

# Hardening (`systemd-analyze security mgr`). Not set, on purpose: PrivateDevices (hides the GPUs),
# MemoryDenyWriteExecute (CUDA's JIT, llama.cpp's and Python's ctypes callbacks need W+X pages), SystemCallFilter
# (CUDA, NCCL and vLLM's workers use calls outside @system-service, NCCL's pidfd_getfd for one), IPAddressDeny
# (it serves the network and pulls from the hubs).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
ReadWritePaths=/var/lib/mgr
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0027

[Install]
WantedBy=multi-user.target
"""


SYSUSERS = """\
# The mgr service's user (systemd-sysusers; written by `mgr service install`): its home is the service's
# StateDirectory, and it may use the GPUs' device nodes (video, render).
u mgr - "mgr model manager" /var/lib/mgr
m mgr video
m mgr render
"""


def user_unit(executable: str, stop_seconds: int = MIN_STOP_SECONDS) -> str:
    return f"""\
# mgr as a user service (written by `mgr service install --user`; change it with `systemctl --user edit mgr`).
# Models and settings are the user's own, as for `mgr serve`; logs: journalctl --user -u mgr.
[Unit]
Description=mgr local model manager (Ollama-, OpenAI- and Anthropic-compatible API)
After=network-online.target

[Service]
Type=notify
ExecStart={executable} serve
EnvironmentFile=-%h/.config/mgr/mgr.env
Restart=on-failure
RestartSec=3
KillMode=mixed
TimeoutStopSec={stop_seconds}
NoNewPrivileges=yes
PrivateTmp=yes

[Install]
WantedBy=default.target
"""


def env_file(settings: Settings) -> str:
    return f"""\
# Environment of the mgr service (MGR_* settings; `mgr serve --help` and README list them). After a change:
#   sudo systemctl restart mgr
# MGR_HOST=0.0.0.0:{settings.bind_port}
# MGR_KEEP_ALIVE=5m
# MGR_SHUTDOWN_TIMEOUT=10s
# MGR_DEBUG=1
# MGR_LOG_FORMAT=json
"""


def system_config(host: str) -> str:
    return f"""\
# mgr's settings for the system service and for every user's `mgr` command (a user's own
# ~/.config/mgr/config.toml wins over this file for that user).
host = "{host}"
models_dir = "/var/lib/mgr/models"
state_dir = "/var/lib/mgr/state"
"""


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing install or uninstall does: write a file, remove one, or run a command."""

    what: str
    command: tuple[str, ...] = ()
    path: Path | None = None
    content: str | None = None  # write `content` to `path` (only if `keep` is False or the file is missing)
    keep: bool = False  # an admin's file: written only where there is none
    remove: bool = False
    check: bool = True  # a failing command stops the install


def executable() -> str:
    """The `mgr` the service runs: the one next to this Python (a venv's bin/), else `python -m mgr.cli`."""
    beside = Path(sys.executable).with_name("mgr")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return f"{sys.executable} -m mgr.cli"


def _under_home(path: str) -> bool:
    return any(path.startswith(prefix) for prefix in ("/home/", "/root/", "/run/user/"))


def _systemctl(user: bool, *args: str) -> tuple[str, ...]:
    return ("systemctl", "--user", *args) if user else ("systemctl", *args)


def install_steps(user: bool, settings: Settings, program: str, home: Path) -> list[Step]:
    stop_seconds = stop_timeout(settings.shutdown_timeout)
    if user:
        unit_path = home / ".config/systemd/user/mgr.service"
        return [
            Step(f"write {unit_path}", path=unit_path, content=user_unit(program, stop_seconds)),
            Step("reload systemd's user units", _systemctl(True, "daemon-reload")),
            Step("enable and start mgr", _systemctl(True, "enable", "--now", SERVICE)),
        ]
    protect_home = "read-only" if _under_home(program) else "yes"
    return [
        Step(f"write {SYSUSERS_PATH}", path=SYSUSERS_PATH, content=SYSUSERS),
        Step("create the mgr user (in the video and render groups)", ("systemd-sysusers", str(SYSUSERS_PATH))),
        Step(f"write {SYSTEM_CONFIG} (kept if it exists)", path=SYSTEM_CONFIG, content=system_config(settings.host),
             keep=True),
        Step(f"write {ENV_FILE} (kept if it exists)", path=ENV_FILE, content=env_file(settings), keep=True),
        Step(f"write {UNIT_PATH}", path=UNIT_PATH, content=system_unit(program, stop_seconds, protect_home)),
        Step("reload systemd's units", _systemctl(False, "daemon-reload")),
        Step("enable and start mgr", _systemctl(False, "enable", "--now", SERVICE)),
    ]


def uninstall_steps(user: bool, home: Path) -> list[Step]:
    unit_path = home / ".config/systemd/user/mgr.service" if user else UNIT_PATH
    return [
        Step("stop and disable mgr", _systemctl(user, "disable", "--now", SERVICE), check=False),
        Step(f"remove {unit_path}", path=unit_path, remove=True),
        Step("reload systemd's units", _systemctl(user, "daemon-reload")),
    ]


class ServiceError(Exception):
    """A step failed or cannot be run here; the message says which and what to do."""


def run_steps(steps: list[Step], dry_run: bool) -> None:
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.what}")
        if step.command:
            print("    $ " + " ".join(step.command))
        if step.path is not None and step.content is not None:
            if step.keep and step.path.exists():
                print(f"    {step.path} exists: kept as it is")
                continue
            if dry_run:
                print("    " + step.content.rstrip("\n").replace("\n", "\n    "))
        if dry_run:
            continue
        if step.path is not None and step.remove:
            step.path.unlink(missing_ok=True)
        elif step.path is not None and step.content is not None:
            step.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = step.path.with_name(step.path.name + ".tmp")
            temporary.write_text(step.content)
            temporary.chmod(0o644)
            temporary.replace(step.path)
        if step.command:
            if shutil.which(step.command[0]) is None:
                raise ServiceError(f"{step.command[0]} is not installed: this needs systemd")
            result = subprocess.run(step.command, check=False)
            if result.returncode != 0 and step.check:
                raise ServiceError(f"`{' '.join(step.command)}` failed with exit code {result.returncode}")


def _needs_root(user: bool, dry_run: bool) -> None:
    if not user and not dry_run and os.geteuid() != 0:
        raise ServiceError("installing the system service needs root: run it with sudo, or use --user for a "
                           "service of your own (--dry-run shows what it would do)")


def install(user: bool, dry_run: bool) -> int:
    _needs_root(user, dry_run)
    settings = load_settings()
    program = executable()
    home = Path.home()
    if not user and _under_home(program):
        print(f"Note: {program} is in a home folder; the service's user `mgr` must be able to read it. "
              f"An install in /opt/mgr (python3 -m venv /opt/mgr && /opt/mgr/bin/pip install ...) avoids that.",
              file=sys.stderr)
    run_steps(install_steps(user, settings, program, home), dry_run)
    if dry_run:
        print("(dry run: nothing was changed)")
        return 0
    logs = "journalctl --user -u mgr -f" if user else "journalctl -u mgr -f"
    print(f"mgr is installed and running. Status: mgr service status{' --user' if user else ''}; logs: {logs}")
    if user:
        print("To keep it running after you log out: loginctl enable-linger")
    return 0


def uninstall(user: bool, dry_run: bool) -> int:
    _needs_root(user, dry_run)
    run_steps(uninstall_steps(user, Path.home()), dry_run)
    if dry_run:
        print("(dry run: nothing was changed)")
    where = "your models folder" if user else f"{STATE} (the models), /etc/mgr (the settings) and the mgr user"
    print(f"Kept: {where}; remove them yourself if you no longer want them.")
    return 0


def status(user: bool, answers: bool | None) -> int:
    """What systemd says (active, enabled), where the daemon answers and where its models are."""
    try:
        settings = load_settings()
        config = default_config_path(os.environ)
    except ConfigError as e:
        raise ServiceError(str(e)) from None
    if shutil.which("systemctl") is not None:
        for question in ("is-active", "is-enabled"):
            result = subprocess.run(_systemctl(user, question, SERVICE), capture_output=True, text=True, check=False)
            said = (result.stdout.strip() or result.stderr.strip() or "unknown").splitlines()[0]
            print(f"{question[3:]}: {said}")
    else:
        print("systemd: not found on this machine")
    print(f"settings: {config}{'' if config.exists() else ' (none: defaults)'}")
    print(f"daemon: {settings.base_url} ({'answers' if answers else 'does not answer'})")
    print(f"models: {settings.models_dir}")
    print(f"logs: journalctl{' --user' if user else ''} -u mgr")
    return 0 if answers else 3  # systemctl status's code for a service that is not running
