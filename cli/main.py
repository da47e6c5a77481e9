"""The `mgr` command: argparse, one handler per subcommand, and the mapping of failures to exit codes.

Start-up time matters (every `mgr ps` pays it), so this module imports only the stdlib, the CLI's own
stdlib-only modules and mgr.registry.config; the daemon's server stack is imported by `mgr serve` alone.
Expected failures (daemon down, HTTP errors, bad input) print one `Error: ...` line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgr.registry.config import ConfigError, Settings, load_settings, parse_duration

from .chat import Session, interactive, parse_option, parse_think, read_format, run_once
from .client import APIError, Client, DaemonUnreachable
from .create import GGUF_MAGIC, CreateError, create_from_modelfile, create_model
from .format import LIST_HEADERS, PS_HEADERS, list_row, ps_row, table
from .lifecycle import LifecycleError
from .service import ServiceError
from .terminal import is_tty

EXIT_INTERRUPTED = 130
SHOW_FIELDS = ("modelfile", "parameters", "template", "system", "license")  # `mgr show --<field>`: one field


def version() -> str:
    """mgr's own version, the installed package's ("0.0.0" when running from a source tree that is not
    installed); the daemon's /api/version answers an Ollama version for clients and this as mgr_version."""
    from importlib import metadata  # only `--version` pays for importlib.metadata

    try:
        return metadata.version("mgr")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class _VersionAction(argparse.Action):
    """Like action="version", but looks the version up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"mgr version {version()}")
        parser.exit()


# Variables only the daemon reads (hub endpoints, tokens, the source order): set in the CLI's environment they
# change nothing, which a user who sets them before `mgr pull` should hear about (see daemon_only_note).
def _daemon_only_variables() -> tuple[str, ...]:
    from mgr.registry.hubs import HUBS

    names = ["MGR_SOURCES"]
    for hub in HUBS.values():
        names += [*hub.endpoint_env, *hub.token_env]
    return tuple(names)


def daemon_only_note(err: Any = None) -> None:
    """One line on stderr naming the daemon's variables set here: they reach the daemon only where it starts."""
    variables = [name for name in _daemon_only_variables() if os.environ.get(name)]
    if variables:
        print(f"note: {', '.join(variables)} {'is' if len(variables) == 1 else 'are'} read by the daemon when it "
              "starts, not by this command: the pull uses the daemon's own settings", file=err or sys.stderr)


# -- handlers ----------------------------------------------------------------------------------------------


SERVE_FLAGS = {"host": "--host", "models_dir": "--models", "keep_alive": "--keep-alive",
               "num_parallel": "--num-parallel", "max_loaded_models": "--max-loaded-models",
               "max_queue": "--max-queue", "num_ctx": "--context-length"}


def serve_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    # Flags stay strings: load_settings parses and validates them exactly like the environment variables.
    return {
        "host": args.host,
        "models_dir": args.models,
        "keep_alive": args.keep_alive,
        "num_parallel": args.num_parallel,
        "max_loaded_models": args.max_loaded_models,
        "max_queue": args.max_queue,
        "num_ctx": args.context_length,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from . import lifecycle

    overrides = serve_overrides(args)
    if args.detach:
        settings = load_settings(overrides)
        flags = [part for key, value in overrides.items() if value is not None for part in (SERVE_FLAGS[key], value)]
        return lifecycle.start(settings, Client(settings.base_url), flags)
    # The heavy import (starlette, uvicorn), paid by this command only.
    from mgr.daemon.server import serve

    listening: list[Settings] = []

    def record(settings: Settings) -> None:
        listening.append(settings)
        lifecycle.write_record(settings)  # `mgr stop-server` and `mgr status` find this process by it

    try:
        return int(serve(overrides, record) or 0)
    finally:
        for settings in listening:
            lifecycle.remove_record(settings)


def cmd_stop_server(args: argparse.Namespace, client: Client) -> int:
    from . import lifecycle

    return lifecycle.stop(args.settings, client)


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    from . import lifecycle

    return lifecycle.status(args.settings, client)


def cmd_create(args: argparse.Namespace, client: Client) -> int:
    if args.source is not None and args.modelfile is not None:
        raise CreateError("give a Modelfile (-f) or a model file (--from), not both")
    if args.source is not None:
        return create_model(client, args.name, args.source, link=args.link)
    path = Path(args.modelfile or "Modelfile").expanduser()
    if path.is_dir() or _starts_with(path, GGUF_MAGIC):  # `-f model.gguf`, as mgr took it before Modelfiles
        return create_model(client, args.name, path)
    return create_from_modelfile(client, args.name, path)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


# pull and show are imported by their own commands: every other command starts without paying for them.


def cmd_pull(args: argparse.Namespace, client: Client) -> int:
    from .pull import pull_model

    daemon_only_note()
    return pull_model(client, args.reference, insecure=args.insecure, tty=is_tty(sys.stdout))


def cmd_show(args: argparse.Namespace, client: Client) -> int:
    from .show import format_files, format_show

    info = client.request_json("POST", "/api/show", {"model": args.name})
    field = next((f for f in SHOW_FIELDS if getattr(args, f)), None)
    if field is not None:
        text = str(info.get(field) or "")
        print(text, end="" if text.endswith("\n") or not text else "\n")
    elif args.files:
        print(format_files(info))
    else:
        print(format_show(info))
    return 0


def cmd_cp(args: argparse.Namespace, client: Client) -> int:
    client.request_json("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    models = client.request_json("GET", "/api/tags").get("models") or []
    print(table(LIST_HEADERS, [list_row(m) for m in models]))
    return 0


def cmd_ps(args: argparse.Namespace, client: Client) -> int:
    models = client.request_json("GET", "/api/ps").get("models") or []
    print(table(PS_HEADERS, [ps_row(m) for m in models]))
    return 0


def cmd_rm(args: argparse.Namespace, client: Client) -> int:
    # One missing name does not stop the others; the exit code still reports it.
    status = 0
    for name in args.names:
        try:
            client.request_json("DELETE", "/api/delete", {"model": name})
        except APIError as e:
            print(f"Error: model '{name}' not found" if e.status == 404 else f"Error: {e.message}", file=sys.stderr)
            status = 1
            continue
        print(f"deleted '{name}'")
    return status


def cmd_stop(args: argparse.Namespace, client: Client) -> int:
    try:
        client.request_json("POST", "/api/generate", {"model": args.name, "prompt": "", "keep_alive": 0,
                                                      "stream": False}, wait=True)
    except APIError as e:
        if e.status == 404:
            raise APIError(f"model '{args.name}' not found", 404) from None
        raise
    return 0


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request's `options`: `-o key=value` pairs first, then the named flags, which win."""
    options: dict[str, Any] = dict(args.option or [])
    named = {
        "temperature": args.temperature,
        "seed": args.seed,
        "num_predict": args.num_predict,
        "num_ctx": args.num_ctx,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    options.update({key: value for key, value in named.items() if value is not None})
    return options


def keep_alive_seconds(value: str | None) -> int | float | None:
    """--keepalive as seconds (5m -> 300, -1 -> -1): a number means the same to every Ollama-style server."""
    if value is None:
        return None
    seconds = parse_duration(value, "--keepalive")
    return int(seconds) if seconds == int(seconds) else seconds


def cmd_doctor(args: argparse.Namespace, client: Client) -> int:
    from .doctor import doctor  # the engines are inspected in a child process; only this command pays

    return doctor(client)


def cmd_service(args: argparse.Namespace, client: Client) -> int:
    from . import service

    if args.action == "install":
        return service.install(args.user, args.dry_run)
    if args.action == "uninstall":
        return service.uninstall(args.user, args.dry_run)
    try:
        client.request_json("GET", "/api/version")
        answers = True
    except (DaemonUnreachable, APIError):
        answers = False
    return service.status(args.user, answers)


def cmd_run(args: argparse.Namespace, client: Client) -> int:
    try:
        response_format = read_format(args.format)
    except ValueError as e:
        raise CreateError(f"--format: {e}") from None
    session = Session(
        model=args.name,
        options=run_options(args),
        system=args.system,
        keep_alive=keep_alive_seconds(args.keep_alive),
        format=response_format,
        verbose=args.verbose,
        think=args.think,
        hide_thinking=args.hidethinking,
        wordwrap=not args.nowordwrap,
        insecure=args.insecure,
    )
    prompt = " ".join(args.prompt)
    stdin_piped = not is_tty(sys.stdin)
    if args.prompt or stdin_piped:
        if stdin_piped:
            piped = sys.stdin.read()
            prompt = f"{prompt}\n\n{piped}" if prompt and piped else (prompt or piped)
        return run_once(client, session, prompt)
    return interactive(client, session, args.settings.state_dir / "history")


# -- parser ------------------------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, Any]:
    try:
        return parse_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _think(text: str) -> bool | str:
    try:
        return parse_think(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serve_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", help="address to listen on, e.g. 127.0.0.1:11434 (MGR_HOST)")
    serve.add_argument("--models", metavar="DIR", help="folder of the model store (MGR_MODELS)")
    serve.add_argument(
        "--keep-alive", metavar="DURATION", help="how long an idle model stays loaded, e.g. 5m, -1 (MGR_KEEP_ALIVE)"
    )
    serve.add_argument("--num-parallel", metavar="N", help="requests a model serves at once (MGR_NUM_PARALLEL)")
    serve.add_argument("--max-loaded-models", metavar="N", help="models kept loaded at once (MGR_MAX_LOADED_MODELS)")
    serve.add_argument("--max-queue", metavar="N", help="requests waiting before new ones are refused (MGR_MAX_QUEUE)")
    serve.add_argument("--context-length", metavar="N", help="default context length (MGR_CONTEXT_LENGTH)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgr", description="A local model manager: serve, pull, create, list and run models."
    )
    parser.add_argument("-v", "--version", action=_VersionAction, help="show the version and exit")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")

    def command(name: str, summary: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, aliases=list(aliases))

    serve = command("serve", "Start the daemon (in the foreground; --detach: in the background)")
    _serve_flags(serve)
    serve.add_argument("-d", "--detach", action="store_true",
                       help="run in the background (log in the state dir's serve.log); stop it with mgr stop-server")
    serve.set_defaults(handler=cmd_serve, needs_client=False)

    start = command("start", "Start the daemon in the background (mgr serve --detach)")
    _serve_flags(start)
    start.set_defaults(handler=cmd_serve, needs_client=False, detach=True)

    stop_server = command("stop-server", "Stop the daemon this CLI talks to (MGR_HOST), by its recorded pid")
    stop_server.set_defaults(handler=cmd_stop_server)

    server_status = command("status", "Whether the daemon this CLI talks to is running: its address, pid, models")
    server_status.set_defaults(handler=cmd_status)

    create = command("create", "Create a model from a Modelfile, a .gguf file or a safetensors folder")
    create.add_argument("name", help="name of the new model, e.g. smollm2:latest")
    create.add_argument(
        "-f",
        "--file",
        dest="modelfile",
        metavar="MODELFILE",
        help="an Ollama Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, MESSAGE, LICENSE); default ./Modelfile",
    )
    create.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="a .gguf file, or a folder with config.json and *.safetensors",
    )
    create.add_argument("--link", action="store_true",
                        help="with --from: use the file where it is, without copying (a hard link, a reflink, or "
                             "a record of the file: see `mgr import`)")
    create.set_defaults(handler=cmd_create)

    pull = command("pull", "Download a model from Hugging Face or ModelScope")
    pull.add_argument(
        "reference", metavar="REF", help="e.g. smollm2, hf.co/OWNER/REPO:Q4_K_M, modelscope.cn/OWNER/REPO"
    )
    pull.add_argument(
        "--insecure", action="store_true", help="accepted for Ollama compatibility (passed on to the daemon)"
    )
    pull.set_defaults(handler=cmd_pull)

    show = command("show", "Show a model's details, source and files")
    show.add_argument("name", metavar="NAME")
    shown = show.add_mutually_exclusive_group()
    shown.add_argument("--modelfile", action="store_true", help="print only the Modelfile")
    shown.add_argument("--parameters", action="store_true", help="print only the parameters")
    shown.add_argument("--template", action="store_true", help="print only the chat template")
    shown.add_argument("--system", action="store_true", help="print only the system prompt")
    shown.add_argument("--license", action="store_true", help="print only the license")
    shown.add_argument("--files", action="store_true", help="print only the stored files")
    show.set_defaults(handler=cmd_show)

    listing = command("list", "List the models in the store", aliases=["ls"])
    listing.set_defaults(handler=cmd_list)

    cp = command("cp", "Copy a model under a new name")
    cp.add_argument("source", metavar="SOURCE")
    cp.add_argument("destination", metavar="DESTINATION")
    cp.set_defaults(handler=cmd_cp)

    rm = command("rm", "Remove models from the store")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(handler=cmd_rm)

    run = command("run", "Chat with a model, or answer one prompt")
    run.add_argument("name", metavar="NAME")
    run.add_argument(
        "prompt", nargs="*", metavar="PROMPT", help="answer this and exit (stdin, when piped, is appended)"
    )
    run.add_argument("--temperature", type=float, metavar="F")
    run.add_argument("--seed", type=int, metavar="N")
    run.add_argument("--num-predict", type=int, metavar="N", help="the most tokens to generate")
    run.add_argument("--num-ctx", type=int, metavar="N", help="context length")
    run.add_argument("--top-k", type=int, metavar="N")
    run.add_argument("--top-p", type=float, metavar="F")
    run.add_argument(
        "-o",
        "--option",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="any model option; VALUE is JSON when it parses (repeatable)",
    )
    run.add_argument(
        "--keepalive", "--keep-alive", dest="keep_alive", metavar="DURATION",
        help="how long the model stays loaded after this, e.g. 5m, 0, -1",
    )
    run.add_argument("--format", metavar="json|FILE", help="answer in JSON, or as the JSON schema in FILE says")
    run.add_argument("--system", metavar="TEXT", help="system message")
    run.add_argument("--think", type=_think, metavar="true|false|high|medium|low",
                     help="--think: think before answering (models that can); --think=false: do not")
    run.add_argument("--hidethinking", action="store_true", help="think, but do not show the thinking")
    run.add_argument("--verbose", action="store_true", help="print timing statistics after each answer")
    run.add_argument("--nowordwrap", action="store_true", help="do not wrap the answer at the terminal's width")
    run.add_argument("--insecure", action="store_true", help="accepted for Ollama compatibility (passed to a pull)")
    run.set_defaults(handler=cmd_run)

    ps = command("ps", "List the loaded models")
    ps.set_defaults(handler=cmd_ps)

    stop = command("stop", "Unload a model now")
    stop.add_argument("name", metavar="NAME")
    stop.set_defaults(handler=cmd_stop)

    doctor = command("doctor", "Check what this installation can run: llama.cpp's backends, vLLM, GPUs, the store")
    doctor.set_defaults(handler=cmd_doctor)

    service = command("service", "Install, remove or check mgr as a systemd service")
    service.add_argument("action", choices=["install", "uninstall", "status"])
    service.add_argument("--user", action="store_true",
                         help="a service of your own (systemctl --user), with your models; default: the machine's")
    service.add_argument("--dry-run", action="store_true", help="print each step and file; change nothing")
    service.set_defaults(handler=cmd_service)

    # commands that live in their own modules (stdlib at import; their heavy imports happen in their handlers)
    from . import bench, importer

    importer.add_commands(command)
    bench.add_commands(command)
    return parser


# -- entry point -------------------------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return 1


def _run_words(words: list[str]) -> list[str]:
    """`ollama run` takes a bare --think as --think=true (a value only after "="): so does `mgr run`."""
    return ["--think=true" if word == "--think" else word for word in words]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The subcommand's own parser reads its words, so that a usage error prints that command's usage; `run`
    takes its flags anywhere (before, between or after the model and the prompt), as `ollama run` does."""
    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if not argv or commands is None or argv[0] not in commands.choices:
        return parser.parse_args(argv)
    name = argv[0]
    sub: argparse.ArgumentParser = commands.choices[name]
    if "--" in argv and name != "run":
        return parser.parse_args(argv)
    if name == "run":
        args = sub.parse_intermixed_args(_run_words(argv[1:]))
    else:
        args = sub.parse_args(argv[1:])
    args.command = name
    return args


def client_settings() -> Settings:
    """The CLI's settings. Ollama's OLLAMA_HOST is the fallback for the daemon's address when MGR_HOST is not
    set (only here: `mgr serve` never binds to it), so a shell set up for `ollama` finds mgr too."""
    settings = load_settings()
    ollama_host = os.environ.get("OLLAMA_HOST", "").strip()
    if ollama_host and not os.environ.get("MGR_HOST") and settings.host == Settings.host:
        try:
            settings = load_settings({"host": ollama_host})
        except ConfigError as e:
            raise ConfigError(f"OLLAMA_HOST (used since MGR_HOST is not set): {e}") from None
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(parser, list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, --version and usage errors: return the code instead of exiting
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if not getattr(args, "needs_client", True):
            return int(args.handler(args))
        settings = args.settings = client_settings()  # once per invocation
        return int(args.handler(args, Client(settings.base_url, settings.client_timeout)))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except DaemonUnreachable as e:
        return _error(
            f"could not connect to mgr at {e.base_url}. Start it with `mgr serve --detach` "
            "(or `sudo systemctl start mgr` for the service)."
        )
    except (APIError, CreateError, ConfigError, ServiceError, LifecycleError) as e:
        return _error(str(e))
    except BrokenPipeError:
        # `mgr list | head`: the reader left. Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the CLI's own files (client.py turns socket errors into ConnectionLost)
        return _error(str(e))


if __name__ == "__main__":
    sys.exit(main())
