"""The gateway's OpenAI API against a real `zmserve serve` serving tests/generator_servable.py's `echo` (its `generate`
is one pure-Python generator stage), asked with the official `openai` package: completions and chat, streamed (SSE)
and whole, usage, the model list, errors as OpenAI's error object with the zmserve code's HTTP status, and a caller
that hangs up mid-stream cancelling the request in the worker. Raw SSE bytes are checked with http.client too."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from tests import generator_servable
from tests.cluster import wait_for
from tests.generator_servable import SERVABLE, expected
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(echo_cluster: LocalCluster) -> tuple[LocalCluster, str]:
    """The shared `echo` cluster (tests/conftest.py) and a gateway in front of it."""
    return echo_cluster, echo_cluster.start_gateway("gateway_openai")


@pytest.fixture(scope="module")
def client(gateway: tuple[LocalCluster, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway[1] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_a_completion_whole_and_streamed(client: openai.OpenAI) -> None:
    text, finish = expected("Hello", 8)
    whole = client.completions.create(model=SERVABLE, prompt="Hello", max_tokens=8)
    assert whole.object == "text_completion" and whole.model == SERVABLE
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, finish)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, 8, 13)

    chunks = list(client.completions.create(model=SERVABLE, prompt="Hello", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) == 8, "one event per token"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_a_stop_token_ends_the_answer_with_finish_reason_stop(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=SERVABLE, prompt="x|yz", max_tokens=9)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == ("zy", "stop")


def test_chat_uses_the_servables_template_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]
    prompt = "system: be\nuser: hi\nassistant:"  # generator_servable.CHAT_TEMPLATE, rendered
    text, finish = expected(prompt, 12)
    whole = client.chat.completions.create(model=SERVABLE, messages=messages, max_tokens=12)
    assert whole.object == "chat.completion"
    assert (whole.choices[0].message.role, whole.choices[0].message.content) == ("assistant", text)
    assert whole.choices[0].finish_reason == finish and whole.usage.prompt_tokens == len(prompt)

    chunks = list(client.chat.completions.create(model=SERVABLE, messages=messages, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish and all(c.object == "chat.completion.chunk" for c in chunks)


def test_the_model_list_names_the_servables_that_generate(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [SERVABLE]


def test_errors_are_openai_error_objects_with_the_codes_status(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVABLE, prompt="", max_tokens=4)  # the servable refuses an empty prompt
    assert caught.value.code == "INVALID_ARGUMENT" and "non-empty string" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVABLE, prompt="hi", temperature=-1)
    assert "temperature must be a finite number >= 0" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVABLE, prompt="hi", stop=["\n"])
    assert "not supported" in caught.value.message and caught.value.param == "stop"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nothing", prompt="hi", stream=True)
    assert caught.value.code == "NOT_FOUND"


def sse(url: str, body: dict) -> tuple[int, str, list[str]]:
    """POST `body` and read the raw answer: status, content type, and the SSE `data:` payloads."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    events = raw.split("\n\n")
    assert events[-1] == "", "every event ends with a blank line"
    assert all(e.startswith("data: ") for e in events[:-1])
    return response.status, response.getheader("content-type"), [e.removeprefix("data: ") for e in events[:-1]]


def test_the_raw_stream_is_server_sent_events_ending_with_done(gateway: tuple[LocalCluster, str]) -> None:
    status, content_type, data = sse(gateway[1], {"model": SERVABLE, "prompt": "ab", "max_tokens": 3,
                                                  "stream": True})
    assert status == 200 and content_type == "text/event-stream" and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["b", "a", "b", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]


def test_a_caller_that_hangs_up_mid_stream_cancels_the_request(gateway: tuple[LocalCluster, str]) -> None:
    cluster, url = gateway
    cancels = generator_servable.worker_cancels(cluster)
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": SERVABLE, "prompt": "ab",
                                                              "max_tokens": 2**30, "stream": True}),
                       {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.read(6) == b"data: "
    response.close()  # mid-stream: both (the response holds the socket open too)
    connection.close()
    wait_for(lambda: generator_servable.worker_cancels(cluster) > cancels, timeout=20,
             what="the worker to drop the stream of the caller that hung up", details=cluster.log_tails)
    assert '"request_abandoned"' in cluster.logs["gateway_openai"].read_text()


def test_mindspore_serving_rest_answers_a_generation_method_whole(gateway: tuple[LocalCluster, str]) -> None:
    host, port = gateway[1].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    instance = {"prompt": "ab", "max_tokens": 3, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                "frequency_penalty": 0.0, "presence_penalty": 0.0, "seed": -1}
    connection.request("POST", f"/model/{SERVABLE}:generate", json.dumps({"instances": [instance]}))
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert (answer["instances"][0]["text"], answer["instances"][0]["finish_reason"]) == ("bab", "length")
