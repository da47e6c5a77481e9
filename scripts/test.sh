#!/usr/bin/env bash
# The whole test suite on a fresh machine: install mgr with the GGUF engine and the test tools, run the
# static checks (ruff, mypy --strict), fetch the real test model, run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh gguf,test
bash scripts/check.sh
export MGR_TEST_GGUF=${MGR_TEST_GGUF:-$(PYTHON=.venv/bin/python bash scripts/fetch-smollm2.sh)}
exec .venv/bin/python -m pytest "$@"
