"""logprobs, n, echo and embedding dimensions through the daemon with the real ollama and openai clients,
against the real llama.cpp runner on SmolLM2 (issue 11 item 6: Ollama has logprobs and dimensions; n > 1 and
completions echo are OpenAI's, which Ollama ignores and mgr serves)."""

from __future__ import annotations

import math

import ollama
import openai
import pytest
from conftest import Daemon

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def clients(daemon: Daemon, smollm2: str) -> tuple[ollama.Client, openai.OpenAI]:
    return ollama.Client(host=daemon.base_url), openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x")


def test_ollama_logprobs_at_temperature_zero(clients: tuple[ollama.Client, openai.OpenAI]) -> None:
    answer = clients[0].chat("smollm2", messages=ASK, logprobs=True, top_logprobs=3,
                             options={"temperature": 0, "num_predict": 8})
    logprobs = answer.logprobs or []
    assert len(logprobs) == answer.eval_count and logprobs
    assert "".join(lp.token for lp in logprobs) == answer.message.content
    for lp in logprobs:
        assert lp.logprob <= 0 and lp.top_logprobs and len(lp.top_logprobs) >= 3
        assert lp.token == max(lp.top_logprobs, key=lambda t: t.logprob).token  # greedy: the top one is chosen
    streamed = [c for c in clients[0].chat("smollm2", messages=ASK, logprobs=True, top_logprobs=3, stream=True,
                                           options={"temperature": 0, "num_predict": 8})]
    assert [lp.token for c in streamed for lp in (c.logprobs or [])] == [lp.token for lp in logprobs]
    generated = clients[0].generate("smollm2", prompt="The capital of France is", raw=True, logprobs=True,
                                    top_logprobs=2, options={"temperature": 0, "num_predict": 4})
    assert generated.logprobs and all(lp.logprob <= 0 for lp in generated.logprobs)


def test_openai_logprobs_n_and_echo(clients: tuple[ollama.Client, openai.OpenAI]) -> None:
    client = clients[1]
    answer = client.chat.completions.create(model="smollm2", messages=ASK, logprobs=True, top_logprobs=2,
                                            temperature=0, max_tokens=6)
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(t.logprob <= 0 and t.token == t.top_logprobs[0].token for t in content)
    two = client.chat.completions.create(model="smollm2", messages=ASK, n=2, temperature=0.9, seed=7,
                                         max_tokens=12)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
    echoed = client.completions.create(model="smollm2", prompt="The capital of France is", echo=True,
                                       temperature=0, max_tokens=4)
    assert echoed.choices[0].text.startswith("The capital of France is")


def test_embedding_dimensions_cut_and_renormalize(clients: tuple[ollama.Client, openai.OpenAI]) -> None:
    full = clients[0].embed("smollm2", input="Paris is in France").embeddings[0]
    cut = clients[0].embed("smollm2", input="Paris is in France", dimensions=64).embeddings[0]
    assert len(full) == 576 and len(cut) == 64
    assert math.isclose(math.fsum(v * v for v in cut), 1.0, rel_tol=1e-4)
    norm = math.sqrt(math.fsum(v * v for v in full[:64]))
    assert all(math.isclose(a, b / norm, rel_tol=1e-3, abs_tol=1e-5) for a, b in zip(cut, full[:64], strict=True))
    openai_cut = clients[1].embeddings.create(model="smollm2", input="Paris is in France", dimensions=64)
    assert len(openai_cut.data[0].embedding) == 64
    with pytest.raises(ollama.ResponseError) as refused:
        clients[0].embed("smollm2", input="x", dimensions=100_000)
    assert refused.value.status_code == 400
