"""Probe: does the order of sequences inside one llama_decode batch change its cost?

Not a pytest test. Run:  .venv/bin/python tests/bench/probe_batch_order.py [--rounds 4] [--model PATH]

One llama-cpp-python context with mgr's engine parameters (8 sequences, kv_unified=false, n_batch=n_ubatch=512,
2 threads), 8 real chat prompts prefilled, then 128 greedy decode steps of 8 tokens. The steps alternate in
blocks of 8 between a batch whose tokens are in ascending seq_id order (0..7, what llama-server always builds:
its slot id is the seq id) and the very same tokens in rotated order (seq 1..7, 0), which is what mgr's engine
builds once a finished request has put its seq id at the back of the free list (`_free_seq_ids.pop(0)` /
`append`) and the batch follows arrival order. Prints the median llama_decode time of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gguf as bench


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--model", type=Path, default=Path(os.environ.get("MGR_TEST_GGUF", bench.DEFAULT_GGUF)))
    args = p.parse_args()

    import llama_cpp as L

    from mgr.daemon.runners.llama.template import ChatTemplate

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(args.model).encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    cp = L.llama_context_default_params()
    cp.n_seq_max = 8
    cp.n_ctx = 8 * 4096
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = 2
    cp.kv_unified = False
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(512, 0, 1)
    template = ChatTemplate(L.llama_model_chat_template(model, None).decode(), "", "")

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    k = 8
    times: dict[str, list[float]] = {"sorted": [], "rotated": []}
    for r in range(args.rounds):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        chains = []
        for _ in range(k):
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            chains.append(chain)
        n, outs, positions = 0, [], []
        for s in range(k):
            text = template.render([{"role": "user", "content":
                                     f"Write a long story about {bench.THINGS[(s + 8 * r) % len(bench.THINGS)]}."}])
            data = text.encode()
            buf = (L.llama_token * 512)()
            m = L.llama_tokenize(vocab, data, len(data), buf, 512, False, True)
            for j in range(m):
                put(n, buf[j], j, s, j == m - 1)
                n += 1
            outs.append(n - 1)
            positions.append(m)
        batch.n_tokens = n
        assert L.llama_decode(ctx, batch) == 0
        last = [L.llama_sampler_sample(chains[s], ctx, outs[s]) for s in range(k)]
        bench.wait_for_idle(600)
        me = psutil.Process()
        busy0, own0, t0 = bench.machine_busy()[0], sum(me.cpu_times()[:2]), time.perf_counter()
        for step in range(128):
            mode = "sorted" if (step // 8) % 2 == 0 else "rotated"
            order = list(range(k)) if mode == "sorted" else list(range(1, k)) + [0]
            for i, s in enumerate(order):
                put(i, last[s], positions[s], s, True)
            batch.n_tokens = k
            t = time.perf_counter()
            assert L.llama_decode(ctx, batch) == 0
            times[mode].append(time.perf_counter() - t)
            new = list(last)
            for i, s in enumerate(order):
                new[s] = L.llama_sampler_sample(chains[s], ctx, i)
            last = new
            positions = [pos + 1 for pos in positions]
        wall = time.perf_counter() - t0
        other = max(0.0, (bench.machine_busy()[0] - busy0) - (sum(me.cpu_times()[:2]) - own0)) / (
            (psutil.cpu_count() or 1) * wall)
        print(f"round {r}: other processes {other:.0%} of the CPUs; median llama_decode: seq-id-sorted batch "
              f"{statistics.median(times['sorted'][-64:]) * 1000:.1f} ms, rotated "
              f"{statistics.median(times['rotated'][-64:]) * 1000:.1f} ms", flush=True)
        for chain in chains:
            L.llama_sampler_free(chain)
    print(f"all rounds: median 8-token llama_decode: seq-id-sorted {statistics.median(times['sorted']) * 1000:.1f} ms, "
          f"rotated {statistics.median(times['rotated']) * 1000:.1f} ms "
          f"({statistics.median(times['rotated']) / statistics.median(times['sorted']):.2f}x)")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
