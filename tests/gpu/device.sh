#!/usr/bin/env bash
# The GPU machine's side of a GPU batch (no network there; every piece is carried by one `run` of the device tool,
# each from its own ignored folder of the checkout, calls back to back). Steps, one per call:
#   device.sh piece DIR          copy a carried folder's files into /tmp/stage (vLLM bundle parts, wheels, ...);
#                                lcp.tar.xz, when there, is unpacked and a CUDA llama-cpp-python build starts detached
#   device.sh unpack             ../shared/gpu/unpack.sh: vLLM into /tmp/vllm-site, SmolLM2 safetensors in /tmp/smollm2-st
#   device.sh setup SRC.tar      mgr's source (git archive of the commit under test) into /tmp/mgr-src; Ray into
#                                /tmp/ray-site if its bundle came; the CUDA llama-cpp-python into /tmp/lcp-site when built
#   device.sh start NAME ARGS    run tests/gpu/NAME.py detached (setsid, from /tmp: a call's tree is replaced by the
#                                next), output to /tmp/NAME.log
#   device.sh queue "[VAR=VALUE ...] NAME ARGS" ...  run several of them one after another, detached (one `start`
#                                for a whole batch: fewer calls, no idle gap between checks), each with its own
#                                environment variables; each to /tmp/NAME.log, the queue's progress to
#                                /tmp/queue.log (`poll queue`)
#   device.sh install [S]        wait up to S seconds for the CUDA llama.cpp build, then put it in /tmp/lcp-site
#   device.sh poll NAME [S]      wait up to S seconds (default 540) for NAME to finish, then print its log
set -uo pipefail
step=$1; shift
install_llama_cpp() {  # once the detached CUDA build is done: llama-cpp-python's Python package over its libraries
  if grep -q "BUILD DONE rc=0" /tmp/lcp-build.log 2>/dev/null && [ ! -d /tmp/lcp-site/llama_cpp ]; then
    mkdir -p /tmp/lcp-site && cp -r /tmp/llama_cpp_python-*/llama_cpp /tmp/lcp-site/
    mkdir -p /tmp/lcp-site/llama_cpp/lib && find /tmp/lcp-build -name "lib*.so*" -exec cp -a {} /tmp/lcp-site/llama_cpp/lib/ \;
    python3 -m pip install -q --no-index --no-deps --target /tmp/lcp-site /tmp/stage/diskcache-*.whl
  fi
}
case $step in
piece)
  mkdir -p /tmp/stage && cp -r "$1"/* /tmp/stage/
  if [ -f /tmp/stage/lcp.tar.xz ]; then
    tar -C /tmp -xJf /tmp/stage/lcp.tar.xz && rm /tmp/stage/lcp.tar.xz
    # one CUDA build of the vendored llama.cpp: its shared libraries (under llama-cpp-python's Python package, as
    # its wheel would hold them) and llama-server from the same source, for the comparison
    setsid bash -c 'cd /tmp/llama_cpp_python-*/vendor/llama.cpp && start=$(date +%s)
      { cmake -B /tmp/lcp-build -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
          -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release \
        && cmake --build /tmp/lcp-build -j "$(nproc)" --target llama-server llama ggml mtmd; } > /tmp/lcp-build.log 2>&1
      echo "BUILD DONE rc=$? in $(( $(date +%s) - start )) s" >> /tmp/lcp-build.log' < /dev/null > /dev/null 2>&1 &
    echo "llama-cpp-python CUDA build started"
  fi
  ls -la /tmp/stage; nvidia-smi -L; df -h /tmp | tail -1 ;;
unpack)
  cp ../shared/gpu/unpack.sh /tmp/stage/ 2>/dev/null || true
  time bash /tmp/stage/unpack.sh /tmp/stage; tail -2 /tmp/lcp-build.log 2>/dev/null ;;
setup)
  rm -rf /tmp/mgr-src && mkdir -p /tmp/mgr-src && tar -C /tmp/mgr-src -xf "$1"
  if [ -f /tmp/stage/ray-site.tar.xz ] && [ ! -d /tmp/ray-site/ray ]; then
    mkdir -p /tmp/ray-site && tar -C /tmp/ray-site -xJf /tmp/stage/ray-site.tar.xz
    python3 -m pip install -q --no-index --no-deps --target /tmp/ray-site /tmp/stage/msgpack-*.whl /tmp/stage/click-*.whl
  fi
  # the Ray bundle's binaries lose their mode in the zip: raylet and gcs_server must be executable
  [ -d /tmp/ray-site/ray ] && find /tmp/ray-site/ray/core/src -type f -size +1M -exec chmod +x {} +
  # uvloop, as `pip install mgr` brings it with uvicorn[standard] (the vLLM bundle lacks it; without it the daemon
  # runs on asyncio's own loop and relays slower than users' installs do)
  ls /tmp/stage/uvloop-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/mgr-extra \
    /tmp/stage/uvloop-*.whl
  install_llama_cpp
  tail -1 /tmp/lcp-build.log 2>/dev/null; ls /tmp/ray-site /tmp/lcp-site 2>/dev/null | head -5 ;;
start)
  name=$1; shift
  install_llama_cpp
  cd /tmp/mgr-src && source tests/gpu/env.sh
  export PYTHONPATH=/tmp/lcp-site:/tmp/ray-site:$PYTHONPATH TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    NCCL_NVLS_ENABLE=0
  setsid bash -c "cd /tmp && python3 /tmp/mgr-src/tests/gpu/$name.py $* > /tmp/$name.log 2>&1; echo EXIT \$? >> /tmp/$name.log" \
    < /dev/null > /dev/null 2>&1 &
  echo "started $name" ;;
queue)
  cd /tmp/mgr-src && source tests/gpu/env.sh
  export PYTHONPATH=/tmp/lcp-site:/tmp/ray-site:$PYTHONPATH TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    NCCL_NVLS_ENABLE=0
  : > /tmp/queue.log
  for job in "$@"; do printf '%s\n' "$job" >> /tmp/queue.jobs; done
  setsid bash -c 'cd /tmp; while read -r job; do
      set -- $job; envs=(); while [[ $1 == *=* ]]; do envs+=("$1"); shift; done; name=$1; shift
      echo "$(date +%T) $job" >> /tmp/queue.log
      # a check queued before the CUDA llama.cpp build ended gets it when it ends (up to 10 min)
      bash /tmp/mgr-src/tests/gpu/device.sh install 600 >> /tmp/queue.log 2>&1
      env "${envs[@]}" python3 "/tmp/mgr-src/tests/gpu/$name.py" "$@" > "/tmp/$name.log" 2>&1; rc=$?
      echo "EXIT $rc" >> "/tmp/$name.log"; echo "$(date +%T) $name exit $rc" >> /tmp/queue.log
      grep -E "FAIL|PASS" "/tmp/$name.log" | tail -40 >> /tmp/queue.log
    done < /tmp/queue.jobs; rm -f /tmp/queue.jobs; echo "EXIT 0" >> /tmp/queue.log' < /dev/null > /dev/null 2>&1 &
  echo "queued $#" ;;
install)
  # wait up to $1 s for a detached CUDA build that is still running, then install it
  waited=0
  while pgrep -f "cmake --build /tmp/lcp-build" > /dev/null && [ "$waited" -lt "${1:-0}" ]; do sleep 5; waited=$((waited + 5)); done
  install_llama_cpp; [ "$waited" -gt 0 ] && echo "waited ${waited}s for the llama.cpp build: $(tail -1 /tmp/lcp-build.log)" ;;
poll)
  name=$1; limit=${2:-540}; waited=0
  until grep -q "^EXIT " "/tmp/$name.log" 2>/dev/null || [ "$waited" -ge "$limit" ]; do sleep 5; waited=$((waited + 5)); done
  cat "/tmp/$name.log"; mkdir -p "$OUT" && cp "/tmp/$name.log" "$OUT/" ;;
esac
