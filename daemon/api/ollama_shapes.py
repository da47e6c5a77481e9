"""One typed shape per wire object of the Ollama API as mgr serves it: the request bodies the adapters read
(ollama.py, ollama_models.py) and the answers they write. The adapters read bodies field by field with their
checks (a wrong type is a 400); these types say what those checks accept, and /openapi.json is generated from
them (api/openapi.py), so they must stay what the handlers really take and send."""

from __future__ import annotations

from typing import Any, Literal, Required, TypedDict

KeepAlive = str | float  # a duration ("5m", "1h", "300ms") or seconds; negative = forever, 0 = unload now
Think = bool | Literal["low", "medium", "high"]
Format = Literal["", "json"] | dict[str, Any]  # "json", or a JSON schema the answer must match


class Options(TypedDict, total=False):
    """Ollama's options: sampling for the runner; num_ctx, num_gpu, num_thread, num_batch for the load.
    Unknown keys are ignored (clients send mirostat, tfs_z, ...)."""

    num_ctx: int
    num_predict: int  # -1 = no limit, -2 = until the context is full
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: str | list[str]
    ignore_eos: bool  # mgr (vLLM's field): generate num_predict tokens whatever the model says
    num_gpu: int
    num_thread: int
    num_batch: int


class ToolFunction(TypedDict, total=False):
    name: Required[str]
    description: str
    parameters: dict[str, Any]  # a JSON schema of the arguments


class Tool(TypedDict, total=False):
    """OpenAI's function tool, as Ollama takes it."""

    type: Literal["function"]
    function: Required[ToolFunction]


class ToolCallFunction(TypedDict, total=False):
    name: Required[str]
    arguments: dict[str, Any] | str  # an object, as Ollama sends it (a JSON string is accepted)
    index: int


class ToolCall(TypedDict, total=False):
    id: str
    function: Required[ToolCallFunction]


class Message(TypedDict, total=False):
    role: Required[str]  # system, user, assistant, tool
    content: str | None
    images: list[str]  # base64, no data: prefix
    tool_calls: list[ToolCall]
    tool_name: str  # a tool result's tool
    name: str
    thinking: str


class ChatRequest(TypedDict, total=False):
    model: Required[str]
    messages: list[Message]  # empty: load the model (with keep_alive 0: unload it)
    tools: list[Tool]
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any]  # mgr's, as OpenAI's
    parallel_tool_calls: bool
    format: Format
    options: Options
    stream: bool  # default true
    keep_alive: KeepAlive
    think: Think
    logprobs: bool
    top_logprobs: int  # 0 to 20
    truncate: bool  # default true: the oldest messages are dropped to fit the context (reported in a header)


class GenerateRequest(TypedDict, total=False):
    model: Required[str]
    prompt: str  # empty: load the model (with keep_alive 0: unload it)
    suffix: str  # fill-in-the-middle: needs the insert capability
    system: str
    template: str  # a Jinja chat template for this request (not Ollama's Go templates)
    context: list[int]  # token ids from an earlier answer: the prompt continues them
    raw: bool  # the prompt as it is, no template (then no system, template or context)
    format: Format
    images: list[str]
    options: Options
    stream: bool  # default true
    keep_alive: KeepAlive
    think: Think
    logprobs: bool
    top_logprobs: int
    truncate: bool


class EmbedRequest(TypedDict, total=False):
    model: Required[str]
    input: Required[str | list[str]]
    truncate: bool  # default true
    dimensions: int
    options: Options
    keep_alive: KeepAlive


class EmbeddingsRequest(TypedDict, total=False):
    """The legacy endpoint: one prompt, one vector."""

    model: Required[str]
    prompt: Required[str]
    options: Options
    keep_alive: KeepAlive


class ModelRequest(TypedDict, total=False):
    """/api/show, /api/delete: a model by name (Ollama's older clients send `name`)."""

    model: str
    name: str


class LoadRequest(TypedDict, total=False):
    """mgr's explicit load and unload (Ollama's form is an empty prompt)."""

    model: Required[str]
    keep_alive: KeepAlive
    options: Options


class CopyRequest(TypedDict):
    source: str
    destination: str


class PullRequest(TypedDict, total=False):
    model: str  # a reference: hf.co/owner/repo[:tag], modelscope.cn/..., or a short name
    name: str
    stream: bool  # default true
    insecure: bool  # accepted, unused


CreateRequest = TypedDict("CreateRequest", {
    "model": str, "name": str,
    "from": str,  # a model in the store; or `files`
    "files": dict[str, str],  # file name -> blob digest (uploaded with POST /api/blobs/{digest})
    "adapters": dict[str, str],
    "template": str, "system": str, "license": str | list[str],
    "parameters": dict[str, Any],
    "messages": list[Message],
    "quantize": str,
    "stream": bool,
}, total=False)


# answers --------------------------------------------------------------------------------------------------
class Logprob(TypedDict, total=False):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[dict[str, Any]]


class Metrics(TypedDict, total=False):
    """On the final chunk (done: true): nanoseconds and token counts."""

    done_reason: Literal["stop", "length", "load", "unload"]
    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class ChatChunk(Metrics, total=False):
    """A line of the NDJSON stream, or (stream false) the whole answer."""

    model: Required[str]
    created_at: Required[str]
    message: Message
    done: Required[bool]
    logprobs: list[Logprob]


class GenerateChunk(Metrics, total=False):
    model: Required[str]
    created_at: Required[str]
    response: str
    thinking: str
    done: Required[bool]
    context: list[int]  # on the final chunk, unless raw: the prompt's and the answer's token ids
    logprobs: list[Logprob]


class EmbedAnswer(TypedDict, total=False):
    model: Required[str]
    embeddings: Required[list[list[float]]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsAnswer(TypedDict):
    embedding: list[float]


class VersionAnswer(TypedDict):
    version: str  # the Ollama API release mgr answers as (version-gated clients read it)
    mgr_version: str


class Details(TypedDict, total=False):
    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class TagsModel(TypedDict):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class TagsAnswer(TypedDict):
    models: list[TagsModel]


class RayShape(TypedDict):
    nodes: list[str]
    pipeline_parallel: int
    tensor_parallel: int


class PsModel(TypedDict, total=False):
    name: Required[str]
    model: Required[str]
    size: Required[int]
    size_vram: Required[int]
    digest: Required[str]
    details: Required[Details]
    expires_at: Required[str]  # keep_alive -1: far in the future, as Ollama shows it
    loaded_at: Required[str | None]
    context_length: Required[int]  # the context each request gets, in tokens
    backend: Required[str]
    state: Required[str]
    gpus: Required[list[int]]
    num_parallel: Required[int]
    active: Required[int]
    queued: Required[int]
    ray: RayShape
    cached_tokens: int  # llama.cpp: prompt tokens its slots keep for later requests (the prompt cache)


class PsAnswer(TypedDict):
    models: list[PsModel]


class QueueModel(TypedDict):
    name: str
    state: str
    active: int
    queued: int
    num_parallel: int


class QueueAnswer(TypedDict):
    models: list[QueueModel]
    queued: int
    max_queue: int


class ShowAnswer(TypedDict, total=False):
    modelfile: str
    parameters: str  # Ollama's text form: `name value` per line
    license: str
    template: str
    system: str | None
    messages: list[Message]
    details: Details
    model_info: dict[str, Any]
    capabilities: list[Literal["completion", "embedding", "tools", "thinking", "vision", "insert"]]
    modified_at: str
    files: list[dict[str, Any]]
    source: dict[str, Any]


class ProgressEvent(TypedDict, total=False):
    """A line of a pull's or a create's progress, or (stream false) its last."""

    status: Required[str]
    digest: str
    total: int
    completed: int
    source: str
    repo: str
    commit: str | None


class Empty(TypedDict):
    """copy and delete answer an empty object."""


class ErrorAnswer(TypedDict):
    error: str
