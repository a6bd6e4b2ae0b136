"""Request and response bodies of the server: the OpenAI API's shapes for /v1/models, /v1/completions,
/v1/chat/completions and /v1/embeddings, and tunelab's own for the task endpoints.

Requests ignore fields they do not know (OpenAI clients send some we do not use, e.g. `user`), but every field
they use is checked: a bad value is a 400 that names the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # optional: the server serves one model; a different name is a 404


# ---------------------------------------------------------------------------------------------- generation


class SamplingRequest(Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: list[str] = Field(default_factory=list)  # a string is read as one stop sequence
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def plain(self) -> dict:
        """{"role", "content"} with the text parts joined, as chat templates expect."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # the OpenAI default for completions

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("at least one prompt")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# ---------------------------------------------------------------------------------------------- embeddings


class EmbeddingRequest(Request):
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("at least one input text")
        if any(not t for t in texts):
            raise ValueError("an input text is empty")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# ---------------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"
    capabilities: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------- tasks


def _texts(cls, value):
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ValueError("at least one input")
    if any(isinstance(t, str) and not t.strip() for t in texts):
        raise ValueError("an input text is empty")
    return value


class ClassifyRequest(Request):
    input: str | list[str]
    text_pair: str | list[str] | None = None

    _check = field_validator("input")(_texts)


class Classification(BaseModel):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class TagRequest(Request):
    """Each input is a text (split into words on white space) or a list of words: "input": "John lives here",
    ["first text", "second text"] or [["John", "lives", "here"]]."""

    input: str | list[str | list[str]]

    def sentences(self) -> list[list[str]]:
        items = [self.input] if isinstance(self.input, str) else self.input
        return [item.split() if isinstance(item, str) else list(item) for item in items]

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        items = [value] if isinstance(value, str) else value
        if not items or any(not (i.split() if isinstance(i, str) else i) for i in items):
            raise ValueError("every input needs at least one word")
        return value


class Entity(BaseModel):
    type: str
    text: str
    start: int  # first word
    end: int  # last word, inclusive


class Tagging(BaseModel):
    index: int
    tokens: list[str]
    tags: list[str]
    entities: list[Entity]


class AnswerRequest(Request):
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)
    max_answer_length: int = Field(default=30, ge=1, le=512)


class AnswerResponse(BaseModel):
    object: Literal["answer"] = "answer"
    model: str
    answer: str
    start: int  # character offset of the answer in the context; -1 when there is none


class FillMaskRequest(Request):
    input: str = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)


class MaskPrediction(BaseModel):
    token: str
    token_id: int
    probability: float
    sequence: str


class FillMaskResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[list[MaskPrediction]]  # one list per mask token


class Seq2SeqRequest(Request):
    input: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    beam_size: int | None = Field(default=None, ge=1, le=16)

    _check = field_validator("input")(_texts)


class GeneratedText(BaseModel):
    index: int
    text: str


class TaskList(BaseModel):
    """The answer of /v1/classify, /v1/tag, /v1/translate and /v1/summarize: one item per input."""

    object: Literal["list"] = "list"
    model: str
    data: list[Classification] | list[Tagging] | list[GeneratedText]
    usage: Usage


# ---------------------------------------------------------------------------------------------- feedback

FEEDBACK_SOURCES = Literal["person", "rule", "reward_model", "gold", "judge"]


def _blank_to_none(value):
    """An empty or white-space text field of a form is no value."""
    return None if isinstance(value, str) and not value.strip() else value


class FeedbackRequest(Request):
    """POST /v1/feedback: one judged answer of the served model, stored as a FeedbackRecord (the server fills
    in `model` and `model_version`). `input` is a text or chat messages; a record needs a verdict, a score or
    a correction (a correction without a verdict makes the verdict bad, as `tunelab feedback review` does)."""

    input: str | list[ChatMessage]
    output: str
    verdict: Literal["good", "bad"] | None = None
    score: float | None = Field(default=None, allow_inf_nan=False)
    critique: str | None = Field(default=None, max_length=20000)
    correction: str | None = Field(default=None, max_length=20000)
    task: str | None = Field(default=None, max_length=40)
    source: FEEDBACK_SOURCES = "person"
    reference: str | list | dict | int | float | bool | None = None
    metadata: dict = Field(default_factory=dict)

    _blanks = field_validator("critique", "correction", "task", mode="before")(_blank_to_none)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value):
        """A text, or messages checked one by one here so that an error names the message, not a member of
        the union."""
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("the input is empty")
            return value
        if not isinstance(value, list):
            raise ValueError("expected a text or a list of chat messages")
        if not value:
            raise ValueError("at least one message")
        messages = []
        for i, message in enumerate(value):
            try:
                messages.append(ChatMessage.model_validate(message))
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                field = f", '{where}'" if where else ""
                raise ValueError(f"message {i}{field}: {first['msg']}") from None
        return messages

    def record_input(self) -> str | list[dict]:
        return self.input if isinstance(self.input, str) else [m.plain() for m in self.input]


class FeedbackItem(BaseModel):
    """A stored feedback record, every field as `tunelab feedback export` writes it."""

    object: Literal["feedback"] = "feedback"
    id: int
    input: str | list[dict]
    output: str
    model: str
    model_version: str | None
    verdict: str | None
    score: float | None
    critique: str | None
    correction: str | None
    source: str
    task: str | None
    reference: str | list | dict | int | float | bool | None
    metadata: dict
    created_at: str
    updated_at: str


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackItem]
    store: str  # the store's file
    total: int  # records of the served model in the store
