#!/usr/bin/env bash
# Static checks: ruff over the whole tree, mypy --strict over the product code (daemon/, registry/, cli/).
# mypy sees the folders as the installed package lays them out (mgr.daemon, mgr.registry, mgr.cli): a link
# tree in a temporary folder, since setuptools' editable install hides them behind an import hook.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m ruff check .
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/mgr"
for part in daemon registry cli; do ln -s "$PWD/$part" "$tree/mgr/$part"; done
MYPYPATH=$tree "$PY" -m mypy --config-file pyproject.toml --cache-dir .mypy_cache -p mgr.daemon -p mgr.registry -p mgr.cli
