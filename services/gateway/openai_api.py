"""OpenAI's text-generation API on the gateway: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

`model` names the servable (`name`, or `name@version`); its method `generate` (the generation contract: `prompt` and
the sampling inputs of `zmserve.sampling.SamplingParams` in, `token_ids`, `text`, `finish_reason`,
`prompt_tokens`, `completion_tokens` out) does the work. Sampling fields the body does not give take
SamplingParams' defaults (greedy, 16 tokens), not OpenAI's temperature 1. `stream: false` is one broker request
answered whole; `stream: true` is a streamed request (PROTOCOL.md §4.11) whose partial answers become Server-Sent
Events exactly as OpenAI sends them (`data: {chunk}` ..., `data: [DONE]`; with `stream_options.include_usage` a last
chunk with the usage). A caller that hangs up mid-stream cancels the request (the gateway's `HangUpWatch`), so the
worker stops generating.

Chat: the servable folder's `chat_template.jinja` (a Jinja template as in Hugging Face tokenizer configs, rendered
in a sandbox with `messages` and `add_generation_prompt=True`), which its worker reports in its status and the
broker in METADATA; a servable without one answers 404 on the chat endpoint.

Errors are OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status of the
zmserve code (`errors.http_status`) and that code as `code`; an error after a stream has begun is one more event
carrying that object, then `data: [DONE]`. Fields that would change the answer and that zmserve does not do (`n`
> 1, `stop`, `logprobs`, `echo`, `suffix`, `best_of`, tools, `logit_bias`) are refused with 400, never ignored.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
import orjson
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zmserve.client import SAMPLING_DTYPES, Generation, generation_inputs, generation_of
from zmserve.codec import Instance
from zmserve.logs import get_logger
from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway.broker_link import BrokerLink
from zmserve_services.gateway.errors import HttpError, http_status

log = get_logger("gateway")

PREFIX = "/v1/"
COMPLETIONS, CHAT, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/models"
GENERATE_METHOD = "generate"
"""The servable method every endpoint calls."""
METADATA_TIMEOUT_S = 2.0
TEMPLATE_TTL_S = 1.0
"""How long a servable's chat template, as the broker said it, is reused."""
REFUSED_FIELDS = {
    "stop": "stop sequences", "logprobs": "logprobs", "top_logprobs": "logprobs", "echo": "echo", "suffix": "suffix",
    "logit_bias": "logit_bias", "tools": "tools", "functions": "functions", "tool_choice": "tools",
    "response_format": "response_format",
}
"""Body fields that would change the answer, which zmserve does not do: a non-empty value is a 400."""

Send = Callable[[dict[str, Any]], Awaitable[None]]
ReadBody = Callable[[], Awaitable[bytes]]


class OpenAIError(Exception):
    """An answer before anything was streamed: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, error: ServingError) -> OpenAIError:
        return cls(http_status(error.code), error.message, str(error.code))

    def body(self) -> bytes:
        return orjson.dumps(error_object(self.status, self.message, self.code, self.param))


def error_object(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Job:
    """One parsed request: which servable, the method's inputs, and how to answer."""

    chat: bool
    servable: str
    version: int
    model: str
    inputs: Instance
    stream: bool
    include_usage: bool


class OpenAIApi:
    def __init__(self, link: BrokerLink, request_timeout: float) -> None:
        self.link = link
        self.request_timeout = request_timeout
        self.environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.templates: dict[tuple[str, int], tuple[float, str]] = {}
        self.compiled: dict[str, jinja2.Template] = {}
        """Chat templates compiled once per text (compiling one costs milliseconds)."""

    async def handle(self, scope: dict[str, Any], read_body: ReadBody, send: Send) -> tuple[int, bytes] | None:
        """(status, JSON body) of a whole answer; None when the answer was streamed (sent here)."""
        path, verb = scope["path"], scope["method"]
        try:
            if path == MODELS:
                expect(verb, "GET")
                return 200, orjson.dumps(await self.models())
            if path not in (COMPLETIONS, CHAT):
                raise OpenAIError(404, f"no route for {path}: the OpenAI API here is POST {COMPLETIONS}, "
                                       f"POST {CHAT} and GET {MODELS}")
            expect(verb, "POST")
            job = await self.parse(path == CHAT, await read_body())
            if job.stream:
                await self.stream(job, send)
                return None
            outputs = await self.link.infer(job.servable, GENERATE_METHOD, job.version, [job.inputs],
                                            self.request_timeout)
            return 200, orjson.dumps(whole_answer(job, generation_of(outputs[0])))
        except ServingError as error:
            failure = OpenAIError.of(error)
        except HttpError as error:
            failure = OpenAIError(error.status, error.message)
        except OpenAIError as error:
            failure = error
        log.info("request_failed", path=path, status=failure.status, code=failure.code, message=failure.message)
        return failure.status, failure.body()

    # ---- requests -------------------------------------------------------------------------------------------
    async def parse(self, chat: bool, raw: bytes) -> Job:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise OpenAIError(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise OpenAIError(400, "'model' (the servable's name) is required", param="model")
        servable, version = parse_model(model)
        for field, what in REFUSED_FIELDS.items():
            if body.get(field) not in (None, False, [], {}, "", {"type": "text"}):
                raise OpenAIError(400, f"{what} ({field!r}) is not supported by zmserve", param=field)
        for field in ("n", "best_of"):
            if body.get(field) not in (None, 1):
                raise OpenAIError(400, f"{field!r} must be 1: zmserve generates one choice per request", param=field)
        if chat:
            prompt = await self.chat_prompt(servable, version, body.get("messages"))
        else:
            prompt = completion_prompt(body.get("prompt"))
        stream = body.get("stream") or False
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise OpenAIError(400, "'stream' must be a boolean and 'stream_options' an object", param="stream")
        return Job(chat, servable, version, model, self.inputs(body, prompt, chat), stream,
                   bool(options.get("include_usage")))

    def inputs(self, body: dict[str, Any], prompt: str, chat: bool) -> Instance:
        sampling = {}
        for name in SAMPLING_DTYPES:
            value = body.get(name)
            if name == "max_tokens" and chat and body.get("max_completion_tokens") is not None:
                value = body["max_completion_tokens"]
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise OpenAIError(400, f"{name!r} must be a number, got {value!r:.40}", param=name)
            if SAMPLING_DTYPES[name](0).dtype.kind == "i" and value != int(value):
                raise OpenAIError(400, f"{name!r} must be an integer, got {value!r}", param=name)
            sampling[name] = int(value) if SAMPLING_DTYPES[name](0).dtype.kind == "i" else float(value)
        try:
            return generation_inputs(prompt, **sampling)
        except (TypeError, ValueError, OverflowError) as error:
            raise OpenAIError(400, str(error)) from None

    async def chat_prompt(self, servable: str, version: int, messages: Any) -> str:
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "'messages' must be a non-empty list", param="messages")
        plain = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise OpenAIError(400, f"messages[{index}] must be an object with a 'role'", param="messages")
            plain.append({"role": message["role"], "content": message_text(index, message.get("content"))})
        template = await self.chat_template(servable, version)
        try:
            compiled = self.compiled.get(template)
            if compiled is None:
                compiled = self.compiled[template] = self.environment.from_string(template)
            return compiled.render(messages=plain, add_generation_prompt=True)
        except jinja2.TemplateError as error:
            raise OpenAIError(500, f"servable {servable!r}'s chat template failed: {error}",
                              str(ErrorCode.INTERNAL)) from None

    async def chat_template(self, servable: str, version: int) -> str:
        cached = self.templates.get((servable, version))
        if cached is not None and time.monotonic() - cached[0] <= TEMPLATE_TTL_S:
            template = cached[1]
        else:
            served = await self.link.served(servable, METADATA_TIMEOUT_S)
            known = [v for v in served.versions if v.servable == servable and version in (0, v.version)]
            if not known:
                raise OpenAIError(404, f"servable {servable!r} (version {version or 'newest'}) is not served",
                                  str(ErrorCode.NOT_FOUND), "model")
            chosen = max(known, key=lambda v: (v.ready, v.version))
            template = chosen.chat_template
            self.templates[servable, version] = (time.monotonic(), template)
        if not template:
            raise OpenAIError(404, f"servable {servable!r} has no chat template (a chat_template.jinja in its "
                                   f"folder); use {COMPLETIONS}", str(ErrorCode.NOT_FOUND), "model")
        return template

    async def models(self) -> dict[str, Any]:
        served = await self.link.served(None, METADATA_TIMEOUT_S)
        names = sorted({v.servable for v in served.versions if GENERATE_METHOD in v.methods})
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "zmserve"}
                                           for name in names]}

    # ---- streamed answers -----------------------------------------------------------------------------------
    async def stream(self, job: Job, send: Send) -> None:
        """Server-Sent Events from the first partial on; an error before it is an ordinary error answer."""
        chunks = Chunks(job)
        started = streamed = False
        generation: Generation | None = None
        answers = self.link.stream(job.servable, GENERATE_METHOD, job.version, job.inputs, self.request_timeout)
        async with contextlib.aclosing(answers):
            try:
                async for final, values in answers:
                    if not started:
                        await send({"type": "http.response.start", "status": 200,
                                    "headers": [(b"content-type", b"text/event-stream"),
                                                (b"cache-control", b"no-cache")]})
                        started = True
                        if job.chat:
                            await send_event(send, chunks.role())
                    if final:
                        generation = generation_of(values)
                        if not streamed and generation.text:  # a method that does not stream: its whole text
                            await send_event(send, chunks.text(generation.text))
                    elif values.get("text"):
                        streamed = True
                        await send_event(send, chunks.text(str(values["text"])))
            except ServingError as error:
                if not started:
                    raise
                log.info("stream_failed", path=CHAT if job.chat else COMPLETIONS, code=error.code,
                         message=error.message)
                await send_event(send, error_object(http_status(error.code), error.message, str(error.code)))
        assert generation is not None or started
        if generation is not None:
            await send_event(send, chunks.finish(generation.finish_reason))
            if job.include_usage:
                await send_event(send, chunks.usage(generation))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def send_event(send: Send, data: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(data) + b"\n\n", "more_body": True})


class Chunks:
    """The stream's chunk objects, as OpenAI shapes them for each endpoint."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.id = answer_id(job.chat)
        self.created = int(time.time())

    def chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.job.chat else
                                 "text_completion", "created": self.created, "model": self.job.model,
                                 "choices": [] if choice is None else [{"index": 0, **choice, "logprobs": None}]}
        if self.job.include_usage:
            chunk["usage"] = None
        return chunk

    def role(self) -> dict[str, Any]:
        return self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def text(self, text: str) -> dict[str, Any]:
        if self.job.chat:
            return self.chunk({"delta": {"content": text}, "finish_reason": None})
        return self.chunk({"text": text, "finish_reason": None})

    def finish(self, reason: str) -> dict[str, Any]:
        if self.job.chat:
            return self.chunk({"delta": {}, "finish_reason": reason})
        return self.chunk({"text": "", "finish_reason": reason})

    def usage(self, generation: Generation) -> dict[str, Any]:
        return {**self.chunk(None), "usage": usage(generation)}


# ---- helpers ------------------------------------------------------------------------------------------------
def whole_answer(job: Job, generation: Generation) -> dict[str, Any]:
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                  "logprobs": None, "finish_reason": generation.finish_reason}
    else:
        choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": generation.finish_reason}
    return {"id": answer_id(job.chat), "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": [choice], "usage": usage(generation)}


def usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def answer_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def parse_model(model: str) -> tuple[str, int]:
    """`name` (the newest ready version) or `name@version`."""
    name, _, version = model.partition("@")
    if version and not version.isdigit():
        raise OpenAIError(400, f"model {model!r}: the version after '@' must be a number", param="model")
    return name, int(version or 0)


def completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(400, "'prompt' must be a string (or a list of one string); token lists and several "
                               "prompts per request are not supported", param="prompt")
    return prompt


def message_text(index: int, content: Any) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise OpenAIError(400, f"messages[{index}].content must be a string or a list of text parts",
                      param="messages")


def expect(verb: str, allowed: str) -> None:
    if verb != allowed:
        raise HttpError(405, f"{verb} is not allowed here; use {allowed}", allow=allowed)
