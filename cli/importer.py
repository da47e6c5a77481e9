"""`mgr import`: models already on disk (Ollama's store, the HF and ModelScope caches) into mgr without copying
them; `mgr verify NAME`: hash again an external file that changed; `mgr du`: what each model takes on disk.

The daemon does the work (it owns the store: POST /api/import, /api/verify, GET /api/disk); this side says where
the user's own caches are (their environment: OLLAMA_MODELS, HF_HUB_CACHE, HF_HOME, MODELSCOPE_CACHE, ~) and
prints the daemon's lines as they come.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import Client

SOURCES = ("ollama", "hf", "modelscope")
DU_HEADERS = ("NAME", "SIZE", "STORED", "LINKED", "EXTERNAL", "SHARED", "RM FREES")


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds this module's subcommands to the CLI's parser (cli/main.py)."""
    importing = command("import", "Bring in the models of Ollama's store, the Hugging Face or the ModelScope "
                                  "cache, without copying them")
    importing.add_argument("source", choices=SOURCES, help="where the models are")
    importing.add_argument("path", nargs="?", metavar="PATH",
                           help="the store or cache folder (default: where that tool keeps them for you: "
                                "$OLLAMA_MODELS or ~/.ollama/models; $HF_HUB_CACHE or ~/.cache/huggingface/hub; "
                                "$MODELSCOPE_CACHE or ~/.cache/modelscope)")
    importing.add_argument("--dry-run", action="store_true",
                           help="list what would come in and the space it takes; change nothing")
    importing.add_argument("--external", action="store_true",
                           help="never hard link or reflink: record the files where they are (deleting them "
                                "there then frees their space; mgr refuses a model whose file changed or went)")
    importing.set_defaults(handler=cmd_import)

    verify = command("verify", "Hash a model's external files again after they changed, so it serves again")
    verify.add_argument("name", metavar="NAME")
    verify.set_defaults(handler=cmd_verify)

    du = command("du", "Show what each model takes on disk: the store's own bytes, linked, external, shared, and "
                       "what rm would free")
    du.set_defaults(handler=cmd_du)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def cmd_import(args: argparse.Namespace, client: Client) -> int:
    from mgr.registry.importers import default_location

    path = _absolute(args.path) if args.path else str(default_location(args.source))
    return run_import(client, {"from": args.source, "path": path, "dry_run": args.dry_run,
                               "external": args.external})


def run_import(client: Client, body: dict[str, Any]) -> int:
    """Send the import and print its lines; 1 when a model failed to come in."""
    from .format import human_size

    failed = 0
    for line in client.stream_ndjson("POST", "/api/import", body):
        status = str(line.get("status", ""))
        if status == "success":
            verb = "would import" if body.get("dry_run") else "imported"
            print(f"{verb} {line.get('imported', 0)} model(s), {human_size(int(line.get('size') or 0))}, "
                  f"{human_size(int(line.get('new_bytes') or 0))} copied"
                  + (f"; {line['skipped']} skipped" if line.get("skipped") else ""))
            failed = int(line.get("failed") or 0)
            continue
        if "size" in line and "modes" in line:
            status += f"  {human_size(int(line['size']))}, {' / '.join(line['modes'])}"
        print(status, file=sys.stderr if line.get("error") or line.get("skipped") else sys.stdout)
        for note in line.get("notes") or ():
            print(f"  note: {note}")
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace, client: Client) -> int:
    answer = client.request_json("POST", "/api/verify", {"model": args.name}, wait=True)
    hashed = answer.get("verified") or []
    print(f"verified {args.name}" + (f": {', '.join(hashed)} hashed again" if hashed else ": nothing changed"))
    return 0


def cmd_du(args: argparse.Namespace, client: Client) -> int:
    from .format import human_size, table

    models = client.request_json("GET", "/api/disk").get("models") or []

    def size(value: Any) -> str:
        return human_size(int(value)) if value else "-"

    rows = [[m["name"], size(m["size"]), size(m["stored"]), size(int(m["hardlink"]) + int(m["reflink"])),
             size(m["external"]), size(m["shared"]), size(m["frees"])] for m in models]
    print(table(DU_HEADERS, rows))
    return 0
