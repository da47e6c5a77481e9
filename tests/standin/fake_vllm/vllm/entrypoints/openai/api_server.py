"""STAND-IN for `python -m vllm.entrypoints.openai.api_server`: parses the arguments mgr gives vLLM (and
refuses unknown ones, as vLLM does), then serves the stand-in runner with vLLM's sleep endpoints."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[4]))  # tests/standin, for runner.py
import runner

from vllm.registered_parsers import REASONING_PARSERS, TOOL_PARSERS

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
parser.add_argument("--enable-auto-tool-choice", action="store_true")
parser.add_argument("--tool-call-parser", choices=TOOL_PARSERS)
parser.add_argument("--reasoning-parser", choices=REASONING_PARSERS)
parser.add_argument("--trust-request-chat-template", action="store_true")
parser.add_argument("--chat-template")
parser.add_argument("--enable-lora", action="store_true")
parser.add_argument("--lora-modules", nargs="*")
parser.add_argument("--max-lora-rank", type=int)
args = parser.parse_args()
if args.enable_auto_tool_choice and not args.tool_call_parser:
    sys.exit("stand-in vLLM: --enable-auto-tool-choice requires --tool-call-parser")  # as vLLM's cli_args
if not Path(args.model, "config.json").is_file():
    sys.exit(f"stand-in vLLM: {args.model} is not a model folder (no config.json)")
# With a reasoning parser, the answer comes after some reasoning, as vLLM 0.25 sends it ("reasoning")
reasoning = ["--reasoning", "The user asks for a capital."] if args.reasoning_parser else []
runner.main(["--port", str(args.port), "--model-name", args.served_model_name, "--ctx-size", str(args.max_model_len),
             "--reply", "The capital of France is Paris.", "--load-seconds", "0.3", *reasoning])
