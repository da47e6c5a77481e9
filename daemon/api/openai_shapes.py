"""One typed shape per wire object of the OpenAI API's request bodies as a client sends them to mgr
(/v1/chat/completions, /v1/completions, /v1/embeddings): what api/openai.py and api/fields.py accept, field by
field (the checks are there). The runner bodies they become are daemon/protocol/shapes.py's ChatBody,
CompletionBody and EmbeddingBody; the answers are relayed as the runners send them, in those shapes too.

/openapi.json is generated from these (api/openapi.py), so they must stay what the handlers take. Fields that
neither mgr nor its engines read pass through to the runner as sent and are not listed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Required, TypedDict

from ..protocol import shapes
from .constraints import NON_EMPTY, NON_NEGATIVE

Role = Literal["system", "user", "assistant", "tool", "developer"]


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImageURL(TypedDict, total=False):
    url: Required[str]  # a data: URL, or an http(s) URL (vLLM fetches it; the llama.cpp runner does not)
    detail: str


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL


class RequestFunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text (an object is taken too)


class RequestToolCall(TypedDict, total=False):
    id: str
    type: Literal["function"]
    function: Required[RequestFunctionCall]


class RequestMessage(TypedDict, total=False):
    role: Required[Role]
    content: str | list[TextPart | ImagePart] | None
    name: str
    tool_calls: list[RequestToolCall]
    tool_call_id: str
    reasoning_content: str


class RequestToolFunction(TypedDict, total=False):
    name: Required[str]
    description: str
    parameters: dict[str, Any]  # a JSON schema of the arguments


class RequestTool(TypedDict):
    type: Literal["function"]
    function: RequestToolFunction


class ContextOptions(TypedDict, total=False):
    """Ollama's options in an OpenAI body: only num_ctx is read (apps that speak the OpenAI API set it)."""

    num_ctx: int


class ChatCompletionRequest(shapes.SamplingFields, total=False):
    model: Required[str]
    messages: Required[Annotated[list[RequestMessage], NON_EMPTY]]
    stream: bool
    stream_options: shapes.StreamOptions
    max_completion_tokens: int
    response_format: shapes.ResponseFormat
    tools: list[RequestTool]
    tool_choice: shapes.ToolChoice
    parallel_tool_calls: bool
    reasoning_effort: Literal["low", "medium", "high"]
    chat_template_kwargs: dict[str, Any]  # e.g. {"enable_thinking": false}
    chat_template: str  # a Jinja chat template for this request only (vLLM's)
    logprobs: bool
    top_logprobs: int
    logit_bias: dict[str, float]  # token id -> -100 to 100
    n: int
    user: str
    truncate: bool  # mgr: drop the oldest messages to fit the context (reported in a header)
    num_ctx: int  # mgr: the context the model loads with (also in `options`)
    options: ContextOptions


class CompletionRequest(shapes.SamplingFields, total=False):
    model: Required[str]
    prompt: Required[str | Annotated[list[Annotated[int, NON_NEGATIVE]], NON_EMPTY]]  # text or token ids
    suffix: str  # fill-in-the-middle: needs the insert capability
    stream: bool
    stream_options: shapes.StreamOptions
    response_format: shapes.ResponseFormat
    logprobs: int  # alternatives per token
    echo: bool
    logit_bias: dict[str, float]
    n: int
    user: str
    num_ctx: int
    options: ContextOptions


class EmbeddingRequest(TypedDict, total=False):
    model: Required[str]
    input: Required[str | Annotated[list[str], NON_EMPTY]]
    encoding_format: Literal["float", "base64"]
    dimensions: int  # cut to this many and renormalized
    truncate: bool  # mgr: cut inputs longer than the context instead of failing
    user: str
    num_ctx: int
    options: ContextOptions
