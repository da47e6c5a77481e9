#!/usr/bin/env bash
# The main job on a fresh machine: install mgr, start the daemon, put a real model in the store and have it
# answer. The daemon keeps running afterwards (its log: $MGR_STATE_DIR or ~/.local/state/mgr/serve.log).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh gguf
mgr=.venv/bin/mgr
if ! $mgr list >/dev/null 2>&1; then
  state=${MGR_STATE_DIR:-$HOME/.local/state/mgr}
  mkdir -p "$state"
  nohup $mgr serve >>"$state/serve.log" 2>&1 &
  echo "started mgr serve (pid $!), log in $state/serve.log"
  for _ in $(seq 1 100); do $mgr list >/dev/null 2>&1 && break; sleep 0.2; done
fi
gguf=$(PYTHON=.venv/bin/python bash scripts/fetch-smollm2.sh)
$mgr create smollm2 --from "$gguf"
$mgr list
echo '>>> What is the capital of France? Answer with one short sentence.'
$mgr run smollm2 "What is the capital of France? Answer with one short sentence." --temperature 0
$mgr ps
echo "mgr is up. Chat: $mgr run smollm2   Stop the daemon: pkill -f 'mgr serve'"
