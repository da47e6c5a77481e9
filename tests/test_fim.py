"""Fill-in-the-middle through the daemon with the real ollama and openai clients.

SmolLM2 has no FIM tokens, so the model with FIM is a copy of its GGUF whose unused control tokens 11, 12 and 13
are renamed <fim_prefix>, <fim_suffix>, <fim_middle> (StarCoder's names) and declared in the metadata
(tokenizer.ggml.fim_pre/suf/mid_token_id), as a coding model's GGUF declares them. SmolLM2 was never trained to
fill a gap, so what is checked is what mgr does: the insert capability, the prompt the runner built (the token
ids it read, returned as Ollama's `context`, compared with llama.cpp's own tokenizer run here on the same file),
and that the answer is what the model generated after <fim_middle>. The plain SmolLM2 is refused with a 400."""

from __future__ import annotations

from pathlib import Path

import httpx
import llama_cpp
import ollama
import openai
import pytest
from conftest import Daemon

pytestmark = pytest.mark.slow

FIM_TOKENS = {"<fim_prefix>": 11, "<fim_suffix>": 12, "<fim_middle>": 13}
FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return result\n"


def fim_copy(gguf_path: Path, target: Path) -> Path:
    """SmolLM2's GGUF with FIM tokens: three unused control tokens renamed and declared."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(gguf_path)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    for text, token in FIM_TOKENS.items():
        tokens[token] = text
    writer = gguf.GGUFWriter(str(target), arch=reader.fields["general.architecture"].contents())
    metadata = {
        "tokenizer.ggml.tokens": MetadataDetails(gguf.GGUFValueType.ARRAY, tokens, sub_type=gguf.GGUFValueType.STRING),
        **{key: MetadataDetails(gguf.GGUFValueType.UINT32, token)
           for key, token in zip(FIM_KEYS, FIM_TOKENS.values(), strict=True)},
    }
    copy_with_new_metadata(reader, writer, metadata, [])
    return target


@pytest.fixture(scope="module")
def fim_model(daemon: Daemon, gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = fim_copy(gguf_path, tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf")
    result = daemon.cli("create", "smol-fim", "--from", str(path))
    assert result.returncode == 0, result.stderr
    return path


class Vocabulary:
    """llama.cpp's own tokenizer on the FIM copy (no weights), independent of the runner."""

    def __init__(self, path: Path) -> None:
        self.vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def tokens(self, text: str) -> list[int]:
        return list(self.vocab.tokenize(text.encode(), add_bos=False, special=True))

    def text(self, tokens: list[int]) -> str:
        return self.vocab.detokenize(tokens).decode()  # control tokens (the end of turn) as nothing

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """<fim_prefix> prefix <fim_suffix> suffix <fim_middle>: llama-server's order, StarCoder's training."""
        return [FIM_TOKENS["<fim_prefix>"], *self.tokens(prefix), FIM_TOKENS["<fim_suffix>"], *self.tokens(suffix),
                FIM_TOKENS["<fim_middle>"]]


@pytest.fixture(scope="module")
def vocabulary(fim_model: Path) -> Vocabulary:
    return Vocabulary(fim_model)


def test_the_fim_copy_can_insert_and_smollm2_cannot(daemon: Daemon, smollm2: str, fim_model: Path) -> None:
    shown = httpx.post(daemon.base_url + "/api/show", json={"model": "smol-fim"}).json()
    assert "insert" in shown["capabilities"]
    assert all(shown["model_info"][key] == token for key, token in zip(FIM_KEYS, FIM_TOKENS.values(), strict=True))
    assert "insert" not in httpx.post(daemon.base_url + "/api/show", json={"model": "smollm2"}).json()["capabilities"]


def test_ollama_generate_fills_the_middle(daemon: Daemon, vocabulary: Vocabulary) -> None:
    answer = ollama.Client(host=daemon.base_url).generate(
        "smol-fim", prompt=PREFIX, suffix=SUFFIX, options={"temperature": 0, "num_predict": 12})
    # what the runner read (Ollama's context: the prompt's token ids, then the answer's), in FIM order
    expected = vocabulary.fim_prompt(PREFIX, SUFFIX)
    assert answer.context is not None and list(answer.context[:len(expected)]) == expected
    assert answer.prompt_eval_count == len(expected)
    # and the answer is what the model generated after <fim_middle>
    middle = list(answer.context[len(expected):])
    assert answer.eval_count and len(middle) in (answer.eval_count, answer.eval_count + 1)  # + the end of turn
    assert answer.response == vocabulary.text(middle)


def test_ollama_generate_streams_the_same_middle(daemon: Daemon, vocabulary: Vocabulary) -> None:
    client = ollama.Client(host=daemon.base_url)
    options = {"temperature": 0, "num_predict": 12}
    chunks = list(client.generate("smol-fim", prompt=PREFIX, suffix=SUFFIX, stream=True, options=options))
    final = chunks[-1]
    expected = vocabulary.fim_prompt(PREFIX, SUFFIX)
    assert final.done and final.context is not None and list(final.context[:len(expected)]) == expected
    whole = client.generate("smol-fim", prompt=PREFIX, suffix=SUFFIX, options=options)
    assert "".join(c.response for c in chunks) == whole.response  # greedy: the same middle either way


def test_openai_completions_fill_the_middle(daemon: Daemon, vocabulary: Vocabulary) -> None:
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    completion = client.completions.create(model="smol-fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=12,
                                           temperature=0, extra_body={"return_token_ids": True})
    choice = completion.choices[0]
    expected = vocabulary.fim_prompt(PREFIX, SUFFIX)
    assert choice.model_extra is not None and choice.model_extra["prompt_token_ids"] == expected
    assert completion.usage is not None and completion.usage.prompt_tokens == len(expected)
    assert choice.text == vocabulary.text(choice.model_extra["token_ids"])
    # one FIM prompt whichever API asks: Ollama's options set to the OpenAI defaults give the same greedy middle
    same = ollama.Client(host=daemon.base_url).generate(
        "smol-fim", prompt=PREFIX, suffix=SUFFIX, options={"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0})
    assert same.response == choice.text


def test_a_model_without_fim_tokens_refuses_a_suffix_in_both_apis(daemon: Daemon, smollm2: str) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=daemon.base_url).generate("smollm2", prompt=PREFIX, suffix=SUFFIX)
    assert refused.value.status_code == 400 and refused.value.error == '"smollm2" does not support insert'
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as also:
        client.completions.create(model="smollm2", prompt=PREFIX, suffix=SUFFIX)
    assert also.value.body["message"] == '"smollm2" does not support insert'  # type: ignore[index]
