# Source on the GPU machine from the repository root, after ../shared/gpu/unpack.sh has run:
#   source tests/gpu/env.sh
# Makes mgr importable without installing it (mgr/daemon, mgr/registry, mgr/cli linked to this checkout),
# adds the one dependency the GPU image and the vLLM bundle lack (platformdirs, carried as a wheel in
# /tmp/stage), and sets what vLLM 0.25 from the bundle needs there.
mkdir -p /tmp/mgr-shim/mgr /tmp/mgr-extra
for part in daemon registry cli; do ln -sfn "$PWD/$part" "/tmp/mgr-shim/mgr/$part"; done
[ -d /tmp/mgr-extra/platformdirs ] || python3 -m zipfile -e /tmp/stage/platformdirs-*.whl /tmp/mgr-extra
export PYTHONPATH=/tmp/mgr-shim:/tmp/mgr-extra:/tmp/vllm-site
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
