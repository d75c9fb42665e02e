"""The OpenAI API's request parsing and answer shapes, without a broker: what is refused (400 with the field as
`param`), how sampling fields become the generation method's inputs, and the chunk objects of each endpoint."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from zmserve.client import Generation
from zmserve_services.gateway.openai_api import (
    Chunks,
    Job,
    OpenAIApi,
    OpenAIError,
    error_object,
    parse_model,
    whole_answer,
)


def parse(body: bytes, chat: bool = False) -> Job:
    return asyncio.run(OpenAIApi(None, 60.0).parse(chat, body))  # type: ignore[arg-type]


def test_sampling_fields_become_the_methods_inputs_with_defaults_for_the_rest() -> None:
    job = parse(b'{"model": "gpt@2", "prompt": ["hi"], "max_tokens": 5, "temperature": 0.5, "seed": 3, '
                b'"stream": true, "stream_options": {"include_usage": true}, "user": "ignored"}')
    assert (job.servable, job.version, job.model, job.stream, job.include_usage) == ("gpt", 2, "gpt@2", True, True)
    inputs = job.inputs
    assert inputs["prompt"] == "hi" and inputs["max_tokens"].dtype == np.int32 and int(inputs["max_tokens"]) == 5
    assert float(inputs["temperature"]) == 0.5 and int(inputs["seed"]) == 3 and int(inputs["top_k"]) == 0


@pytest.mark.parametrize(("body", "param", "words"), [
    (b'{"prompt": "hi"}', "model", "'model'"),
    (b'{"model": "m", "prompt": [1, 2]}', "prompt", "token lists"),
    (b'{"model": "m", "prompt": "hi", "stop": ["x"]}', "stop", "not supported"),
    (b'{"model": "m", "prompt": "hi", "n": 2}', "n", "must be 1"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": 2.5}', "max_tokens", "must be an integer"),
    (b'{"model": "m", "prompt": "hi", "temperature": "hot"}', "temperature", "must be a number"),
    (b'{"model": "m", "prompt": "hi", "top_p": 0}', None, "top_p must be in (0, 1]"),
    (b'{"model": "m@x", "prompt": "hi"}', "model", "must be a number"),
    (b'[1]', None, "JSON object"),
])
def test_what_is_refused_is_a_400_naming_the_field(body: bytes, param: str | None, words: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(body)
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


def test_chunks_and_whole_answers_have_openais_shapes() -> None:
    chat = Job(True, "m", 0, "m", {}, True, True)
    chunks = Chunks(chat)
    assert chunks.role()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks.text("hi")["object"] == "chat.completion.chunk" and chunks.text("hi")["usage"] is None
    generation = Generation("hi", [1, 2], "stop", 3, 2)
    assert chunks.usage(generation)["choices"] == [] and chunks.usage(generation)["usage"]["total_tokens"] == 5
    completion = Job(False, "m", 0, "m", {}, False, False)
    assert Chunks(completion).finish("length")["choices"][0] == {"index": 0, "text": "", "finish_reason": "length",
                                                                 "logprobs": None}
    answer = whole_answer(chat, generation)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert answer["id"].startswith("chatcmpl-") and whole_answer(completion, generation)["object"] == "text_completion"
    assert error_object(503, "down", "UNAVAILABLE")["error"]["type"] == "server_error"
    assert parse_model("m") == ("m", 0)


class OneAnswerLink:
    """A broker link whose method does not stream: its one answer is the final one."""

    async def stream(self, *args: object) -> object:
        yield True, {"text": "whole", "token_ids": np.array([1, 2], np.int32), "finish_reason": "stop",
                     "prompt_tokens": np.int32(1), "completion_tokens": np.int32(2)}


def test_a_method_that_does_not_stream_still_streams_its_whole_text_once() -> None:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def scenario() -> None:
        api = OpenAIApi(OneAnswerLink(), 60.0)  # type: ignore[arg-type]
        await api.stream(Job(False, "m", 0, "m", {}, True, False), send)

    asyncio.run(scenario())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    events = [m["body"].decode() for m in sent[1:]]
    assert events[-1] == "data: [DONE]\n\n" and sent[-1]["more_body"] is False
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [("whole", None),
                                                                                             ("", "stop")]
