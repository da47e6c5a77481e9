"""Images through mgr to the real vLLM (issue 11's last item), on the GPU machine after ../shared/gpu/unpack.sh and
`source tests/gpu/env.sh`:

    python3 tests/gpu/vision_vllm.py /tmp/smollm2-st [qwen2vl|llava]

No vision model can be fetched there, so one is made. qwen2vl (the default): Qwen2-VL's architecture (vLLM's
Qwen2VLForConditionalGeneration) at a tiny size with random weights and SmolLM2's tokenizer plus Qwen2-VL's vision
tokens (a 112x112 image: 8x8 patches of 14 pixels, merged 2x2 into 16 image tokens). llava: LLaVA with SmolLM2-135M's
real weights as its language model and a tiny CLIP tower (vLLM 0.25's LLaVA did not import with transformers 5.17 on
the GPU image: pixtral's PixtralRotaryEmbedding is gone). Neither can describe an image; what is checked is the path:
mgr
sees the vision capability in its config, Ollama's `images` and OpenAI's `image_url` parts reach vLLM, which runs
the vision tower (the prompt grows by the image's tokens), the answer is 200 with text; a text-only model answers
Ollama's 400 for images. PASS/FAIL per check, all run, exit 1 if any failed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import httpx
from harness import FAILED, Daemon, check, say, section, skip_unless

ROOT = Path(os.environ.get("MGR_GPU_ROOT", "/tmp/mgr-vision"))
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_SIDE = {"qwen2vl": 112, "llava": 64}


def build_qwen2vl(text_folder: str, out: Path) -> None:
    """A Qwen2-VL of random weights, shaped as the real config.json is (scaled down: head_dim 128 keeps the real
    mrope_section), with SmolLM2's tokenizer and Qwen2-VL's vision tokens added."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    tokenizer.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
                         special_tokens=True)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")}
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": 256, "initializer_range": 0.02,
        "intermediate_size": 512, "max_position_embeddings": 4096, "max_window_layers": 2,
        "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": (len(tokenizer) + 63) // 64 * 64,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 2, "embed_dim": 64, "mlp_ratio": 2, "num_heads": 4, "in_chans": 3,
                          "hidden_size": 256, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    loaded = AutoConfig.from_pretrained(out)
    model = Qwen2VLForConditionalGeneration._from_config(loaded, torch_dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    parts: dict[str, object] = {"image_processor": images, "tokenizer": tokenizer}
    if hasattr(transformers, "Qwen2VLVideoProcessor"):
        parts["video_processor"] = transformers.Qwen2VLVideoProcessor()
    transformers.Qwen2VLProcessor(**parts, chat_template=QWEN_TEMPLATE).save_pretrained(out)
    tokenizer_config = out / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data["chat_template"] = QWEN_TEMPLATE
    tokenizer_config.write_text(json.dumps(data))


def build(text_folder: str, out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text = AutoModelForCausalLM.from_pretrained(text_folder, torch_dtype=torch.bfloat16)
    text.resize_token_embeddings(len(tokenizer))
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=64)
    config = LlavaConfig(vision_config=vision, text_config=text.config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    config.torch_dtype = torch.bfloat16
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.weight.data.copy_(text.lm_head.weight.data)
    model.save_pretrained(out, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", chat_template=TEMPLATE)
    processor.save_pretrained(out)
    tokenizer_config = out / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data["chat_template"] = TEMPLATE
    tokenizer_config.write_text(json.dumps(data))


def png(side: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main(text_folder: str, arch: str) -> None:
    out = ROOT / "tiny-llava"
    with section(f"build the tiny {arch}") as wanted:
        skip_unless(wanted)
        (build_qwen2vl if arch == "qwen2vl" else build)(text_folder, out)
        check((out / "config.json").exists(), f"written to {out}: {sorted(p.name for p in out.iterdir())}")
    daemon = Daemon(ROOT, '[models."tiny-llava:latest"]\nvllm_args = ["--enforce-eager", "--max-model-len", "2048"]\n'
                          '[models."smol-text:latest"]\nvllm_args = ["--enforce-eager"]\n')
    daemon.start()
    image = png(IMAGE_SIDE[arch])
    try:
        with section("images through mgr to vLLM") as wanted:
            skip_unless(wanted)
            made = daemon.mgr("create", "tiny-llava", "--from", str(out))
            check(made.returncode == 0, f"mgr create tiny-llava {made.stderr[-300:]}")
            shown = httpx.post(daemon.url + "/api/show", json={"model": "tiny-llava"}).json()
            check("vision" in shown.get("capabilities", []), f"capabilities {shown.get('capabilities')}")
            plain = httpx.post(daemon.url + "/api/chat", timeout=900, json={
                "model": "tiny-llava", "stream": False, "options": {"num_predict": 8},
                "messages": [{"role": "user", "content": "What is in the picture?"}]})
            check(plain.status_code == 200, f"text only: {plain.status_code} {plain.text[:300]}")
            with_image = httpx.post(daemon.url + "/api/chat", timeout=300, json={
                "model": "tiny-llava", "stream": False, "options": {"num_predict": 8},
                "messages": [{"role": "user", "content": "What is in the picture?", "images": [image]}]})
            check(with_image.status_code == 200, f"Ollama images: {with_image.status_code} {with_image.text[:300]}")
            if plain.status_code == 200 and with_image.status_code == 200:
                grown = with_image.json()["prompt_eval_count"] - plain.json()["prompt_eval_count"]
                say(f"     prompt tokens without / with the image: {plain.json()['prompt_eval_count']} / "
                    f"{with_image.json()['prompt_eval_count']}")
                check(grown >= 16, f"the image became {grown} prompt tokens (16 patches)")
            openai = httpx.post(daemon.url + "/v1/chat/completions", timeout=300, json={
                "model": "tiny-llava", "max_tokens": 8, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is in the picture?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]})
            check(openai.status_code == 200, f"OpenAI image_url: {openai.status_code} {openai.text[:300]}")
            if openai.status_code == 200:
                say(f"     usage with the image: {openai.json()['usage']}")
                check(openai.json()["usage"]["prompt_tokens"] >= 16 + 5, "the image counted in the prompt")
        with section("a text-only model refuses images with Ollama's 400") as wanted:
            skip_unless(wanted)
            made = daemon.mgr("create", "smol-text", "--from", text_folder)
            refused = httpx.post(daemon.url + "/api/chat", timeout=60, json={
                "model": "smol-text", "stream": False,
                "messages": [{"role": "user", "content": "What is this?", "images": [image]}]})
            check(refused.status_code == 400 and "does not support images" in refused.text,
                  f"{refused.status_code} {refused.text[:200]}")
    finally:
        daemon.runner_logs(25)
        daemon.stop()
    say(f"{len(FAILED)} failed" if FAILED else "ALL PASS")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2-st", sys.argv[2] if len(sys.argv) > 2 else "qwen2vl")
