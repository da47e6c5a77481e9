"""One typed shape per wire object of OpenAI's Responses API as mgr serves it (checked against the openai
client's types in openai/types/responses/): the Response, its output items, the input items a client sends
or that are stored, and the streaming events. TypedDicts, as in daemon/protocol/shapes.py: they go to
json.dumps as they are. `total=False` marks fields a sender may leave out."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Required, TypedDict

from .constraints import NON_EMPTY

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


# content parts ------------------------------------------------------------------------------------------
class InputText(TypedDict):
    type: Literal["input_text"]
    text: str


class InputImage(TypedDict, total=False):
    type: Literal["input_image"]
    image_url: str  # a data: URL or an http(s) URL (the engine decides whether it fetches)
    detail: str


class OutputText(TypedDict):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class ReasoningText(TypedDict):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(TypedDict):
    type: Literal["summary_text"]
    text: str


# items: what `output` holds, and what `input` takes (the same shapes passed back, plus the two below) -------
class MessageItem(TypedDict, total=False):
    id: str
    type: Literal["message"]
    role: Literal["user", "system", "developer", "assistant"]
    status: ItemStatus
    content: list[InputText | InputImage | OutputText]


class FunctionCallItem(TypedDict, total=False):
    id: str
    type: Literal["function_call"]
    status: ItemStatus
    call_id: str
    name: str
    arguments: str  # JSON text


class FunctionCallOutputItem(TypedDict, total=False):
    id: str
    type: Literal["function_call_output"]
    status: ItemStatus
    call_id: str
    output: str | list[InputText | InputImage]


class ReasoningItem(TypedDict, total=False):
    id: str
    type: Literal["reasoning"]
    status: ItemStatus
    summary: list[SummaryText]
    content: list[ReasoningText]
    encrypted_content: str  # mgr: the reasoning text itself, when `include` asks for it (see responses.py)


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
OutputItem = MessageItem | FunctionCallItem | ReasoningItem


# the request --------------------------------------------------------------------------------------------
class RequestReasoning(TypedDict, total=False):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None
    summary: Literal["auto", "concise", "detailed"] | None


class InputMessage(TypedDict, total=False):
    """A message in `input`: content as a string or as parts; `type` may be left out."""

    type: Literal["message"]
    role: Required[Literal["user", "system", "developer", "assistant"]]
    content: Required[str | list[InputText | InputImage | OutputText]]


class CreateRequest(TypedDict, total=False):
    """POST /v1/responses as responses_input.py reads it (the field checks are there). Chat Completions'
    sampling extras (top_k, min_p, seed, stop, ...) are taken too and passed to the runner."""

    model: Required[str]
    input: Required[str | Annotated[list[InputMessage | MessageItem | FunctionCallItem | FunctionCallOutputItem
                                         | ReasoningItem], NON_EMPTY]]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None  # 0 to 2
    top_p: float | None  # 0 to 1
    tools: list[FunctionTool]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    reasoning: RequestReasoning
    text: TextConfig
    store: bool  # default true: the response can be continued (previous_response_id) and fetched
    stream: bool
    previous_response_id: str
    metadata: dict[str, str]  # at most 16 keys of 64 characters, values of 512
    truncation: Literal["auto", "disabled"]
    include: list[str]


# the Response -------------------------------------------------------------------------------------------
class FunctionTool(TypedDict):
    """Responses' flat function tool (Chat Completions nests the same under `function`)."""

    type: Literal["function"]
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class FunctionToolChoice(TypedDict):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | FunctionToolChoice


class TextFormat(TypedDict, total=False):
    type: Literal["text", "json_object", "json_schema"]
    name: str
    schema: dict[str, Any]
    description: str
    strict: bool | None


class TextConfig(TypedDict, total=False):
    format: TextFormat
    verbosity: str


class ReasoningConfig(TypedDict):
    effort: str | None
    summary: str | None


class InputTokensDetails(TypedDict):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(TypedDict):
    reasoning_tokens: int


class Usage(TypedDict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(TypedDict):
    reason: Literal["max_output_tokens"]


class ResponseError(TypedDict):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class Echo(TypedDict):
    """The Response fields that repeat what the request asked for."""

    tools: list[FunctionTool]
    tool_choice: ToolChoice
    text: TextConfig
    reasoning: ReasoningConfig | None
    parallel_tool_calls: bool
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    truncation: Literal["auto", "disabled"]
    metadata: dict[str, str]


class Response(TypedDict):
    id: str
    object: Literal["response"]
    created_at: int
    completed_at: int | None
    status: ResponseStatus
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningConfig | None
    store: bool
    temperature: float | None
    top_p: float | None
    text: TextConfig
    tool_choice: ToolChoice
    tools: list[FunctionTool]
    truncation: Literal["auto", "disabled"]
    usage: Usage | None
    metadata: dict[str, str]
    background: bool


class DeletedResponse(TypedDict):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class ItemList(TypedDict):
    object: Literal["list"]
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoredResponse(TypedDict):
    """What the store keeps per response: the Response and every input item the model saw for it (the stored
    conversation it continued, then its own input), so a continuation needs no other record."""

    response: Response
    input_items: list[Item]


# streaming events: every one carries `type` and `sequence_number` -----------------------------------------
class LifecycleEvent(TypedDict):
    """response.created, .in_progress, .completed, .incomplete, .failed"""

    type: str
    sequence_number: int
    response: Response


class OutputItemEvent(TypedDict):
    """response.output_item.added, .done"""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(TypedDict):
    """response.content_part.added, .done"""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDeltaEvent(TypedDict, total=False):
    """response.output_text.delta and response.reasoning_text.delta (the latter without logprobs)"""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any]


class TextDoneEvent(TypedDict, total=False):
    """response.output_text.done and response.reasoning_text.done (the latter without logprobs)"""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any]


class SummaryPartEvent(TypedDict):
    """response.reasoning_summary_part.added, .done"""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    summary_index: int
    part: SummaryText


class SummaryTextEvent(TypedDict, total=False):
    """response.reasoning_summary_text.delta (delta), .done (text)"""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    summary_index: int
    delta: str
    text: str


class ArgumentsEvent(TypedDict, total=False):
    """response.function_call_arguments.delta (delta), .done (arguments)"""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    delta: str
    arguments: str


Event = (LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent | SummaryPartEvent
         | SummaryTextEvent | ArgumentsEvent)
