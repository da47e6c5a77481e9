"""A tiny safetensors model folder for STAND-IN engines: a llama config.json (so the daemon's memory estimate
and placement see a real shape) and one 32-byte tensor. No engine could run it; the stand-ins never try."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_tiny_safetensors_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "max_position_embeddings": 8192}))
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    return folder
