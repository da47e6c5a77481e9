"""The reasoning split of the llama.cpp runner on recorded `<think>` outputs: whole and split at every
position; the model opening the block, and the template having opened it in the prompt."""

from __future__ import annotations

import pytest

from mgr.daemon.runners.llama.reasoning import ReasoningSplitter, opens_block, thinks

# (the template opened the block, output, reasoning, content)
RECORDED = [
    # Qwen3-0.6B, thinking on: it opens the block itself
    (False, "<think>\nOkay, the user is asking for the capital of France. That's Paris.\n</think>\n\n"
            "The capital of France is **Paris**.",
     "Okay, the user is asking for the capital of France. That's Paris.", "The capital of France is **Paris**."),
    # DeepSeek-R1-Distill-Qwen-1.5B: its template ends the prompt with "<think>\n", only </think> appears
    (True, "Alright, so I need to figure out 2 + 2.\n\nThat is 4.\n</think>\n\n**Answer:** 4",
     "Alright, so I need to figure out 2 + 2.\n\nThat is 4.", "**Answer:** 4"),
    # Qwen3 with enable_thinking false: the template wrote an empty block, the answer is all content
    (False, "The capital of France is Paris.", "", "The capital of France is Paris."),
    # cut off by max_tokens while reasoning
    (True, "Let me think about this step by step. First", "Let me think about this step by step. First", ""),
    (False, "<think>\nHmm", "Hmm", ""),
    # a <think> later in the answer is content: only the start opens the block
    (False, "Use the <think> tag.", "", "Use the <think> tag."),
    (False, "", "", ""),
]


def _split(inside: bool, chunks: list[str]) -> tuple[str, str]:
    splitter = ReasoningSplitter(inside)
    parts = [splitter.feed(chunk) for chunk in chunks] + [splitter.finish()]
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)


@pytest.mark.parametrize(("inside", "text", "reasoning", "content"), RECORDED)
def test_recorded_outputs_split(inside: bool, text: str, reasoning: str, content: str) -> None:
    assert _split(inside, [text]) == (reasoning, content)
    assert _split(inside, list(text)) == (reasoning, content)
    for cut in range(len(text) + 1):
        assert _split(inside, [text[:cut], text[cut:]]) == (reasoning, content), cut


def test_reasoning_streams_and_holds_back_only_a_possible_close() -> None:
    splitter = ReasoningSplitter(inside=True)
    assert splitter.feed("First, ") == ("First,", "")  # trailing whitespace waits for what follows
    assert splitter.feed("add.</th") == (" add.", "")
    assert splitter.feed("ink>\n\nIt") == ("", "It")
    assert splitter.feed(" is 4.") == ("", " is 4.")
    assert splitter.finish() == ("", "")


def test_templates_and_prompts() -> None:
    qwen3 = "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    assert thinks(qwen3) and thinks("{{ content.split('</think>')[-1] }}")
    assert not thinks("{% for message in messages %}{{ message['content'] }}{% endfor %}") and not thinks(None)
    assert opens_block("<|im_start|>assistant\n<think>\n")
    assert not opens_block("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_block("<|im_start|>assistant\n")
