#!/usr/bin/env bash
# The whole test suite on a fresh machine: install mgr with the GGUF engine and the test tools, run the
# static checks (ruff, mypy --strict), fetch the real test model, run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh gguf,test
# System packages some tests drive, installed here when missing and root (or passwordless sudo) can: Debian's
# Chromium (the web console's tests, tests/test_ui.py) and systemd-analyze (the unit's checks, tests/test_service.py).
# Without them those tests fail and say how to install them.
missing=""
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing=" chromium"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
if [ -n "$missing" ] && command -v apt-get >/dev/null; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo -n"
  if [ -z "$as_root" ] || sudo -n true 2>/dev/null; then
    echo "installing$missing for the tests (apt-get install$missing)"
    # shellcheck disable=SC2086
    { $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing \
      >/dev/null; } || echo "could not install$missing: the tests that need it will fail" >&2
  fi
fi
bash scripts/check.sh
export MGR_TEST_GGUF=${MGR_TEST_GGUF:-$(PYTHON=.venv/bin/python bash scripts/fetch-smollm2.sh)}
exec .venv/bin/python -m pytest "$@"
