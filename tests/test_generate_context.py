"""/api/generate's `context` (returned, and honoured when sent back), `template` per request and `raw`'s rules,
through the real ollama client against the daemon and the real SmolLM2 runner; prompts as token ids through the
real openai client. What the runner read is checked token by token: the answer's `context` is the prompt's and
the answer's token ids, compared with llama.cpp's own tokenizer run here on the same file."""

from __future__ import annotations

from pathlib import Path

import httpx
import llama_cpp
import ollama
import openai
import pytest
from conftest import Daemon

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 16}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def client(daemon: Daemon, smollm2: str) -> ollama.Client:
    return ollama.Client(host=daemon.base_url)


@pytest.fixture(scope="module")
def vocab(gguf_path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)


def text(vocab: llama_cpp.Llama, tokens: list[int]) -> str:
    return vocab.detokenize(tokens, special=True).decode()


def test_generate_returns_the_prompt_and_answer_tokens_as_context(client: ollama.Client,
                                                                  vocab: llama_cpp.Llama) -> None:
    answer = client.generate("smollm2", prompt="My name is Ada. Say hello to me.", options=GREEDY)
    context = list(answer.context or [])
    assert answer.prompt_eval_count and len(context) >= answer.prompt_eval_count + (answer.eval_count or 0)
    prompt, generated = context[:answer.prompt_eval_count], context[answer.prompt_eval_count:]
    # the prompt is the model's chat template around the user's turn; the answer is what was generated
    assert text(vocab, prompt).endswith("<|im_start|>user\nMy name is Ada. Say hello to me.<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    assert vocab.detokenize(generated).decode() == answer.response


def test_a_context_sent_back_is_what_the_next_prompt_continues(client: ollama.Client) -> None:
    first = client.generate("smollm2", prompt="My name is Ada. Say hello to me.", options=GREEDY)
    earlier = list(first.context or [])
    second = client.generate("smollm2", prompt="What is my name?", context=earlier, options=GREEDY)
    alone = client.generate("smollm2", prompt="What is my name?", options=GREEDY)
    assert second.prompt_eval_count and alone.prompt_eval_count
    # the runner read the earlier tokens, then the new turn through the template, nothing else
    assert second.prompt_eval_count == len(earlier) + alone.prompt_eval_count
    continued = list(second.context or [])
    assert continued[:len(earlier)] == earlier
    assert continued[len(earlier):second.prompt_eval_count] == list(alone.context or [])[:alone.prompt_eval_count]


def test_a_streamed_generate_ends_with_the_context(client: ollama.Client) -> None:
    chunks = list(client.generate("smollm2", prompt="Say hello.", stream=True, options=GREEDY))
    assert all(c.context is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.done and final.prompt_eval_count and final.context
    whole = client.generate("smollm2", prompt="Say hello.", options=GREEDY)
    assert list(final.context) == list(whole.context or [])


def test_a_request_template_renders_this_request_only(client: ollama.Client, vocab: llama_cpp.Llama) -> None:
    answer = client.generate("smollm2", prompt="Hi there", system="Be brief.", template=TEMPLATE, options=GREEDY)
    assert answer.prompt_eval_count and answer.context
    assert text(vocab, list(answer.context[:answer.prompt_eval_count])) == \
        "system: Be brief.\nuser: Hi there\nassistant:"
    plain = client.generate("smollm2", prompt="Hi there", system="Be brief.", options=GREEDY)
    model_template = text(vocab, list((plain.context or [])[:plain.prompt_eval_count]))
    assert model_template.startswith("<|im_start|>system\nBe brief.")


def test_a_context_continues_through_the_request_template(client: ollama.Client, vocab: llama_cpp.Llama) -> None:
    first = client.generate("smollm2", prompt="Hi there", template=TEMPLATE, options=GREEDY)
    second = client.generate("smollm2", prompt="And now?", template=TEMPLATE, context=first.context, options=GREEDY)
    assert second.prompt_eval_count and second.context
    read = text(vocab, list(second.context[:second.prompt_eval_count]))
    assert read.startswith("user: Hi there\nassistant:") and read.endswith("user: And now?\nassistant:")


def test_raw_answers_no_context(client: ollama.Client) -> None:
    answer = client.generate("smollm2", prompt="The capital of France is", raw=True, options=GREEDY)
    assert answer.response and answer.context is None


@pytest.mark.parametrize("extra", [{"system": "Be brief."}, {"template": TEMPLATE}, {"context": [1, 2, 3]}])
def test_raw_with_system_template_or_context_is_a_400(client: ollama.Client, extra: dict[str, object]) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate("smollm2", prompt="Hello", raw=True, **extra)  # type: ignore[arg-type]
    assert refused.value.status_code == 400
    assert refused.value.error == "raw mode does not support template, system, or context"


@pytest.mark.parametrize(("body", "says"), [
    ({"template": "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}"}, "looks like a Go template"),
    ({"template": "{% for m in messages %}"}, "not a valid Jinja template"),
    ({"context": ["a", "b"]}, "context must be a list of token ids"),
    ({"context": [10**9]}, "not in this model's vocabulary"),
    ({"context": [1, 2], "suffix": "x"}, "context cannot be combined with suffix"),
    ({"template": TEMPLATE, "suffix": "x"}, "leave template off"),
])
def test_a_bad_template_or_context_is_a_400(daemon: Daemon, smollm2: str, body: dict[str, object], says: str) -> None:
    answer = httpx.post(daemon.base_url + "/api/generate", timeout=60,
                        json={"model": "smollm2", "prompt": "Hello", "stream": False, **body})
    assert answer.status_code == 400, answer.text
    assert says in answer.json()["error"]


def test_openai_completions_take_a_prompt_of_token_ids(daemon: Daemon, client: ollama.Client,
                                                       vocab: llama_cpp.Llama) -> None:
    tokens = list(vocab.tokenize(b"The capital of France is", add_bos=False))
    openai_client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    by_ids = openai_client.completions.create(model="smollm2", prompt=tokens, max_tokens=8, temperature=0)
    by_text = openai_client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                               temperature=0)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(tokens)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_openai_chat_takes_a_chat_template_for_one_request(daemon: Daemon, smollm2: str,
                                                           vocab: llama_cpp.Llama) -> None:
    openai_client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    answer = openai_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi there"}], max_tokens=4, temperature=0,
        extra_body={"chat_template": TEMPLATE, "return_token_ids": True})
    assert answer.model_extra is not None
    assert text(vocab, answer.model_extra["prompt_token_ids"]) == "user: Hi there\nassistant:"
