"""``POST /v1/chat/completions`` in OpenAI's schema, so the ``openai`` client (and anything built on it) works.

A conversation carries one image (an ``image_url`` content part with a ``data:`` URL: PNG, JPEG or DICOM); the
text of the last user message is the question. The student answers single-turn, as it was trained: it gets the
VQA instruction (Appendix A.1) with that question and, with retrieval on, the nearest case's annotation; earlier
turns and system messages are not sent to it. Retrieval is on unless the request says ``"rag": false`` (with the
``openai`` client: ``extra_body={"rag": False}``), and the retrieved cases come back in ``evidence``, a field
OpenAI's schema does not have and its clients keep (``completion.model_extra["evidence"]``).

``stream: true`` answers as server-sent events in OpenAI's chunk format. The answer is generated as a whole in a
batch with other requests and then sent as chunks: streaming changes the format, not when the first word comes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, AsyncIterator, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serve_apps.errors import ApiError
from serve_apps.generator import Answer

MAX_MESSAGES = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: Annotated[str, StringConstraints(min_length=1)]
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[ContentPart]]
    name: Optional[str] = None


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class ChatRequest(_Strict):
    model: Annotated[str, StringConstraints(min_length=1)]
    messages: List[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[Literal[1]] = None
    user: Optional[str] = None
    rag: Optional[bool] = None


class ChatTurn(BaseModel):
    """What the student is asked: the one image (as sent) and the question."""

    image_url: str
    question: str
    image_field: str


def read_turn(req: ChatRequest) -> ChatTurn:
    """The conversation's one image and the last user message's text; a 400 naming the field otherwise."""
    images = [
        (f"messages[{m}].content[{p}].image_url.url", part.image_url.url)
        for m, msg in enumerate(req.messages)
        if not isinstance(msg.content, str)
        for p, part in enumerate(msg.content)
        if isinstance(part, ImagePart)
    ]
    if not images:
        raise ApiError(400, "field 'messages': include the image as an image_url content part", param="messages")
    if len(images) > 1:
        raise ApiError(400, f"field 'messages': one image per request, got {len(images)}", param="messages")
    last = req.messages[-1]
    where = f"messages[{len(req.messages) - 1}]"
    if last.role != "user":
        raise ApiError(400, f"field '{where}.role': the last message must be the user's question", param=where)
    text = last.content if isinstance(last.content, str) else "\n".join(
        p.text for p in last.content if isinstance(p, TextPart)
    )
    if not text.strip():
        raise ApiError(400, f"field '{where}.content': the question is empty", param=f"{where}.content")
    field, url = images[0]
    return ChatTurn(image_url=url, question=text.strip(), image_field=field)


def max_new_tokens(req: ChatRequest, server_max: int) -> Optional[int]:
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > server_max:
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"field '{field}': at most {server_max} on this server", param=field)
    return asked


def check_streaming_options(req: ChatRequest) -> None:
    if req.stream_options and req.stream_options.include_usage:
        raise ApiError(
            400, "field 'stream_options.include_usage': token usage is not reported", param="stream_options"
        )


def _finish_reason(answer: Answer) -> str:
    return "length" if answer.tokens >= answer.max_new_tokens else "stop"


def completion(answer: Answer, model: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": _finish_reason(answer),
                "logprobs": None,
            }
        ],
        "evidence": [n.evidence() for n in answer.neighbours],
    }


async def stream_chunks(answer: Answer, model: str) -> AsyncIterator[str]:
    """Server-sent events: the role, the content, the finish reason (with the evidence), then ``[DONE]``."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}  # fmt: skip

    def event(delta: dict, finish: Optional[str] = None, **extra) -> str:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    if answer.text:
        yield event({"content": answer.text})
    yield event({}, _finish_reason(answer), evidence=[n.evidence() for n in answer.neighbours])
    yield "data: [DONE]\n\n"
