"""One typed shape per wire object of the runner protocol (OpenAI's, plus mgr's `truncate` and `timings`).

TypedDicts, not classes: bodies go to json.dumps and come from json.loads as they are, so the types cost
nothing on the data path. `total=False` marks fields a sender may leave out.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"
EMBEDDING_PATH = "/v1/embeddings"
HEALTH_PATH = "/health"

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
    content: str | None
    name: str  # a tool result's tool name
    tool_calls: list[ToolCall]
    tool_call_id: str


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


class ResponseFormat(TypedDict, total=False):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any]


class ChatBody(SamplingFields, total=False):
    model: str
    messages: list[ChatMessage]
    stream: bool
    stream_options: StreamOptions
    response_format: ResponseFormat
    tools: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any]
    truncate: bool  # mgr: drop the oldest non-system messages to fit the context


class CompletionBody(SamplingFields, total=False):
    model: str
    prompt: str
    stream: bool
    stream_options: StreamOptions
    response_format: ResponseFormat


class EmbeddingBody(TypedDict, total=False):
    model: str
    input: list[str]
    encoding_format: Literal["float", "base64"]
    truncate: bool  # mgr: cut inputs longer than the context instead of failing


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    tool_calls: list[ToolCallDelta]


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None


class ChatChunk(TypedDict, total=False):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None
    timings: Timings  # mgr: on the chunk that carries finish_reason


class TextChoice(TypedDict):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class TextChunk(TypedDict, total=False):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None
    timings: Timings


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    finish_reason: FinishReason | None


class ChatCompletion(TypedDict, total=False):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings


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


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorBody(TypedDict):
    error: ErrorDetail


Chunk = ChatChunk | TextChunk
