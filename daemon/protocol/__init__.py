"""The internal runner protocol: what the daemon sends to a runner and what comes back.

Every runner (the llama.cpp runner, vLLM's OpenAI server, the tests' stand-ins) serves, on 127.0.0.1:<port>:

    POST /v1/chat/completions   shapes.ChatBody       -> shapes.ChatCompletion, or SSE of shapes.ChatChunk
    POST /v1/completions        shapes.CompletionBody -> shapes.TextCompletion, or SSE of shapes.TextChunk
    POST /v1/embeddings         shapes.EmbeddingBody  -> shapes.EmbeddingList
    POST /tokenize              vLLM's: messages or a prompt -> token ids (count_tokens, Ollama's `context`)
    GET  /health                200 when ready, 503 while loading; the only path that needs no runner secret

Every request but /health carries `Authorization: Bearer <the runner's secret>` (runner_secret.py).

These are OpenAI's shapes, with mgr's extensions (ours, not OpenAI's or vLLM's; vLLM ignores them):
    request  `truncate`  (chat, embeddings) the runner may drop the oldest non-system messages (chat) or cut
                         inputs (embeddings) to fit the context, as Ollama does; false: fail instead
    answer   `timings`   on the final chunk (or the whole answer): prompt_ms, predicted_ms, the engine's own
                         clock, so that Ollama's nanosecond metrics are the engine's numbers
Errors are one shape, built by errors.openai_error_body for the daemon, the relay and the llama.cpp runner.
Both sides check the same bounds (limits.py), strict JSON (strict_json.py) and Unicode text (surrogates.py).

This package is a leaf: stdlib only, imported by the runner processes as well as the daemon.
"""
