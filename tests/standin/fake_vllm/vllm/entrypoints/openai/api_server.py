"""STAND-IN for `python -m vllm.entrypoints.openai.api_server`: parses the arguments mgr gives vLLM (and
refuses unknown ones, as vLLM does), then serves the stand-in runner with vLLM's sleep endpoints."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[4]))  # tests/standin, for runner.py
import runner

parser = argparse.ArgumentParser(prog="vllm-stand-in")
parser.add_argument("--model", required=True)
parser.add_argument("--served-model-name", required=True)
parser.add_argument("--host", required=True)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--max-model-len", type=int, required=True)
parser.add_argument("--max-num-seqs", type=int, required=True)
parser.add_argument("--tensor-parallel-size", type=int, required=True)
parser.add_argument("--gpu-memory-utilization", type=float)
parser.add_argument("--enable-sleep-mode", action="store_true")
parser.add_argument("--distributed-executor-backend")
parser.add_argument("--pipeline-parallel-size", type=int)
parser.add_argument("--enforce-eager", action="store_true")
args = parser.parse_args()
if not Path(args.model, "config.json").is_file():
    sys.exit(f"stand-in vLLM: {args.model} is not a model folder (no config.json)")
runner.main(["--port", str(args.port), "--model-name", args.served_model_name, "--ctx-size", str(args.max_model_len),
             "--reply", "The capital of France is Paris.", "--load-seconds", "0.3"])
