#!/usr/bin/env bash
# The main job on a fresh machine: install mgr, start the daemon, put a real model in the store and have it
# answer. The daemon keeps running afterwards (its log: $MGR_STATE_DIR or ~/.local/state/mgr/serve.log;
# `mgr stop-server` stops it). install.sh links ~/.local/bin/mgr, so `mgr` works from any folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh gguf
mgr=.venv/bin/mgr
$mgr serve --detach  # in the background, its pid recorded (a daemon already answering is left as it is)
gguf=$(PYTHON=.venv/bin/python bash scripts/fetch-smollm2.sh)
$mgr create smollm2 --from "$gguf"
$mgr list
echo '>>> What is the capital of France? Answer with one short sentence.'
$mgr run smollm2 "What is the capital of France? Answer with one short sentence." --temperature 0
$mgr ps
echo "mgr is up. Chat: mgr run smollm2   Status: mgr status   Stop the daemon: mgr stop-server"
