"""One typed shape per wire object of Anthropic's Messages API as mgr answers it (POST /v1/messages and
/v1/messages/count_tokens): the message, its content blocks, usage, the stream's events and the error body.

Requests are read field by field in anthropic_request.py (every field checked there, with Anthropic's 400 for
what is wrong); their types here say what those checks accept, for /openapi.json (api/openapi.py) and the
fuzzer that reads it. TypedDicts, as in daemon/protocol/shapes.py: they go to json.dumps as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Required, TypedDict

from .constraints import NON_EMPTY

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
ErrorType = Literal["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"]


# content blocks --------------------------------------------------------------------------------------------
class TextBlock(TypedDict):
    type: Literal["text"]
    text: str


class ThinkingBlock(TypedDict):
    type: Literal["thinking"]
    thinking: str
    signature: str  # Anthropic's proof of its own reasoning; mgr has none to give, so it is empty


class ToolUseBlock(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


class Usage(TypedDict):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int  # no Anthropic prompt caching (cache_control) here: always 0
    cache_read_input_tokens: int


class Message(TypedDict):
    id: str  # msg_...
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[ContentBlock]
    model: str  # as the client named it
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(TypedDict):
    input_tokens: int


# requests ---------------------------------------------------------------------------------------------------
class TextParam(TypedDict, total=False):
    type: Required[Literal["text"]]
    text: Required[str]
    cache_control: dict[str, Any]  # accepted, unused


class ImageSource(TypedDict, total=False):
    type: Required[Literal["base64", "url"]]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]  # base64
    data: str  # base64
    url: str


class ImageParam(TypedDict):
    type: Literal["image"]
    source: ImageSource


class ToolUseParam(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultParam(TypedDict, total=False):
    type: Required[Literal["tool_result"]]
    tool_use_id: Required[str]
    content: str | list[TextParam | ImageParam]
    is_error: bool


class ThinkingParam(TypedDict, total=False):
    type: Required[Literal["thinking"]]
    thinking: Required[str]
    signature: str


class DocumentSource(TypedDict):
    type: Literal["text"]
    media_type: str
    data: str


class DocumentParam(TypedDict):
    """A plain-text document (its text is read as the turn's)."""

    type: Literal["document"]
    source: DocumentSource


class UserMessage(TypedDict):
    role: Literal["user"]
    content: str | list[TextParam | ImageParam | ToolResultParam | DocumentParam]


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | list[TextParam | ThinkingParam | ToolUseParam]


class ToolParam(TypedDict, total=False):
    name: Required[str]
    description: str
    input_schema: Required[dict[str, Any]]
    type: Literal["custom"]


class ToolChoiceParam(TypedDict, total=False):
    type: Required[Literal["auto", "any", "tool", "none"]]
    name: str  # type "tool"
    disable_parallel_tool_use: bool


class ThinkingConfig(TypedDict, total=False):
    type: Required[Literal["enabled", "disabled", "adaptive"]]
    budget_tokens: int  # enabled: at least 1024, less than max_tokens
    display: Literal["summarized", "omitted"]


class CountTokensRequest(TypedDict, total=False):
    """POST /v1/messages/count_tokens."""

    model: Required[str]
    messages: Required[Annotated[list[UserMessage | AssistantMessage], NON_EMPTY]]
    system: str | list[TextParam]
    tools: list[ToolParam]
    tool_choice: ToolChoiceParam
    thinking: ThinkingConfig


class MessagesRequest(CountTokensRequest, total=False):
    """POST /v1/messages. Fields mgr has no use for (metadata, service_tier, container, ...) are accepted and
    ignored."""

    max_tokens: Required[int]
    temperature: float
    top_p: float
    top_k: int
    stop_sequences: list[str]
    stream: bool
    metadata: dict[str, Any]


# stream events, in the order they come -----------------------------------------------------------------------
class MessageStart(TypedDict):
    type: Literal["message_start"]
    message: Message  # content empty, stop_reason null


class Ping(TypedDict):
    type: Literal["ping"]


class BlockStart(TypedDict):
    type: Literal["content_block_start"]
    index: int
    content_block: ContentBlock  # text "", thinking "", or tool_use with input {}


class TextDelta(TypedDict):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(TypedDict):
    type: Literal["thinking_delta"]
    thinking: str


class InputJsonDelta(TypedDict):
    type: Literal["input_json_delta"]
    partial_json: str  # a piece of the tool's input, as JSON text


class BlockDelta(TypedDict):
    type: Literal["content_block_delta"]
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class BlockStop(TypedDict):
    type: Literal["content_block_stop"]
    index: int


class MessageDeltaFields(TypedDict):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(TypedDict):
    """Cumulative counts. The runners count the prompt only when they finish, so its count comes here, not in
    message_start (0 there): the SDKs' accumulators take input_tokens from message_delta when it is sent."""

    input_tokens: int
    output_tokens: int


class MessageDelta(TypedDict):
    type: Literal["message_delta"]
    delta: MessageDeltaFields
    usage: DeltaUsage


class MessageStop(TypedDict):
    type: Literal["message_stop"]


StreamEvent = MessageStart | Ping | BlockStart | BlockDelta | BlockStop | MessageDelta | MessageStop


# errors ---------------------------------------------------------------------------------------------------
class ErrorDetail(TypedDict):
    type: ErrorType
    message: str


class ErrorBody(TypedDict):
    type: Literal["error"]
    error: ErrorDetail
