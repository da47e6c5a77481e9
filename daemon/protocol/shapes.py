"""One typed shape per wire object of the runner protocol (OpenAI's, plus mgr's `truncate` and `timings`).

vLLM's extras that both runners speak: `chat_template` (a Jinja chat template for one request), a completion
prompt given as token ids, `return_token_ids` (the prompt's and the answer's token ids come back: Ollama's
`context`), and POST /tokenize. A prompt cut to fit the context (mgr's `truncate`) is reported in the answer's
TRUNCATED_HEADER: the number of prompt tokens dropped.

TypedDicts, not classes: bodies go to json.dumps and come from json.loads as they are, so the types cost
nothing on the data path. `total=False` marks fields a sender may leave out.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"
EMBEDDING_PATH = "/v1/embeddings"
HEALTH_PATH = "/health"
TRUNCATED_HEADER = "X-Mgr-Prompt-Truncated"
TOKENIZE_PATH = "/tokenize"  # vLLM's path, outside /v1

FinishReason = Literal["stop", "length", "tool_calls"]
Role = Literal["system", "user", "assistant", "tool", "developer"]


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(TypedDict, total=False):
    role: str
    content: str | list[dict[str, Any]] | None  # a list: OpenAI content parts (text, image_url)
    name: str  # a tool result's tool name
    tool_calls: list[ToolCall]
    tool_call_id: str
    reasoning_content: str  # the model's reasoning, split from content (vLLM's and llama-server's name)


class NamedToolChoice(TypedDict):
    type: Literal["function"]
    function: dict[str, str]  # {"name": ...}


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(TypedDict, total=False):
    include_usage: bool


class SamplingFields(TypedDict, total=False):
    """Sampling fields both engines accept (OpenAI's plus vLLM's extras)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    typical_p: float
    repetition_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    seed: int
    max_tokens: int
    stop: list[str]
    ignore_eos: bool


class ResponseFormat(TypedDict, total=False):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any]


class ChatBody(SamplingFields, total=False):
    model: str
    messages: list[ChatMessage]
    stream: bool
    stream_options: StreamOptions
    response_format: ResponseFormat
    tools: list[dict[str, Any]]  # OpenAI's [{type: function, function: {name, description, parameters}}]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    chat_template_kwargs: dict[str, Any]  # e.g. {"enable_thinking": false}
    reasoning_effort: Literal["low", "medium", "high"]
    logprobs: bool
    top_logprobs: int
    n: int
    truncate: bool  # mgr: drop the oldest non-system messages to fit the context
    chat_template: str  # vLLM: a Jinja chat template used for this request only
    return_token_ids: bool  # vLLM: prompt_token_ids and token_ids in the answer


class CompletionBody(SamplingFields, total=False):
    model: str
    prompt: str | list[int]  # text, or token ids read as they are
    suffix: str  # fill-in-the-middle: the text after the insertion point
    stream: bool
    stream_options: StreamOptions
    response_format: ResponseFormat
    logprobs: int  # legacy completions: how many alternatives per token
    echo: bool
    n: int
    return_token_ids: bool  # vLLM: prompt_token_ids and token_ids on the choices


class EmbeddingBody(TypedDict, total=False):
    model: str
    input: list[str]
    encoding_format: Literal["float", "base64"]
    dimensions: int  # cut to this many and renormalized
    truncate: bool  # mgr: cut inputs longer than the context instead of failing


class PromptTokensDetails(TypedDict):
    cached_tokens: int  # prompt tokens read from a cache (llama.cpp's slot, vLLM's prefix cache), not computed


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: NotRequired[PromptTokensDetails]


class Timings(TypedDict):
    """mgr: the engine's own clock for the prompt and the generated tokens."""

    prompt_ms: float
    predicted_ms: float


class ToolCallDelta(TypedDict, total=False):
    index: int
    id: str
    type: Literal["function"]
    function: dict[str, str]  # name and/or a piece of arguments


class ChatDelta(TypedDict, total=False):
    role: str
    content: str | None
    reasoning_content: str
    tool_calls: list[ToolCallDelta]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(TypedDict):
    """Chat logprobs: one entry per generated token."""

    content: list[TokenLogprob] | None


class ChatChunkChoice(TypedDict, total=False):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None
    token_ids: list[int]  # return_token_ids: this chunk's generated tokens
    stop_reason: str | int | None  # vLLM's: the stop string (or token id) that ended it; None: end of turn


class ChatChunk(TypedDict, total=False):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None
    timings: Timings  # mgr: on the chunk that carries finish_reason
    prompt_token_ids: list[int]  # return_token_ids


class TextLogprobs(TypedDict):
    """Legacy completions logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TextChoice(TypedDict):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: TextLogprobs | None
    prompt_token_ids: NotRequired[list[int]]  # return_token_ids
    token_ids: NotRequired[list[int]]


class TextChunk(TypedDict, total=False):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None
    timings: Timings


class ChatChoice(TypedDict, total=False):
    index: int
    message: ChatMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None
    token_ids: list[int]  # return_token_ids


class ChatCompletion(TypedDict, total=False):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings
    prompt_token_ids: list[int]  # return_token_ids


class TextCompletion(TypedDict, total=False):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    timings: Timings


class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(TypedDict):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class TokenizeChatBody(TypedDict, total=False):
    """vLLM's /tokenize for a conversation: the prompt its chat template makes, as the engine would see it."""

    model: str
    messages: list[ChatMessage]
    tools: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any]
    chat_template: str  # vLLM: this request's own Jinja chat template
    add_generation_prompt: bool  # default true
    add_special_tokens: bool  # default false: the template writes BOS where the model wants one


class TokenizeTextBody(TypedDict, total=False):
    """vLLM's /tokenize for a raw prompt."""

    model: str
    prompt: str
    add_special_tokens: bool  # default true


class TokenizeAnswer(TypedDict, total=False):
    count: int
    max_model_len: int  # the context one sequence has
    tokens: list[int]
    token_strs: list[str] | None


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorBody(TypedDict):
    error: ErrorDetail


Chunk = ChatChunk | TextChunk
