"""MindSpore Serving's RESTful scheme and the error mapping, no processes: URLs, bodies, and how instances'
outcomes become one answer (status and JSON)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway import ms_rest
from zmserve_services.gateway.errors import HTTP_STATUS, http_status


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_its_http_status(code: ErrorCode) -> None:
    assert code in HTTP_STATUS


def test_statuses_say_whose_fault_it_is() -> None:
    assert [http_status(code) for code in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                                           "DEADLINE_EXCEEDED", "INTERNAL", "SOMETHING_NEW")] == \
        [400, 404, 429, 503, 504, 500, 500]


@pytest.mark.parametrize(("path", "target"), [
    ("/model/matmul:predict", ("matmul", 0, "predict")),
    ("/model/matmul/version/3:predict", ("matmul", 3, "predict")),
    ("/model/matmul/version/0:predict", ("matmul", 0, "predict")),
    ("/model/a.b-c:x:y", ("a.b-c", 0, "x:y")),
])
def test_paths(path: str, target: tuple) -> None:
    assert ms_rest.parse_path(path) == ms_rest.Target(*target)


@pytest.mark.parametrize(("path", "message"), [
    ("/model/matmul", "please check url, the keyword:[service method] must contain."),
    ("/model/matmul:", "please check url, the keyword:[service method] must contain."),
    ("/model/:predict", "please check url, the keyword:[model] must contain."),
    ("/model/m/version/x:p", "please check url, the keyword:[version] value invalid, request version number x"),
    ("/model/m/version/-2:p", "please check url, version number range failed, request version number -2"),
    ("/model/m/version/4294967295:p",
     "please check url, version number range failed, request version number 4294967295"),
    ("/model/m/other/1:p", "please check url: expected /model/{servable}[/version/{n}]:{method}, got "
                           "/model/m/other/1:p"),
])
def test_bad_paths(path: str, message: str) -> None:
    with pytest.raises(ServingError) as caught:
        ms_rest.parse_path(path)
    assert (caught.value.code, caught.value.message) == (ErrorCode.INVALID_ARGUMENT, message)


def test_body_instances_become_zmserve_values() -> None:
    instances = ms_rest.parse_body(b'{"instances": [{"x": [[1.0, 2.0]], "n": 3}, {"x": [[0.5, 0.0]], "n": -1}]}')
    assert [sorted(i) for i in instances] == [["n", "x"], ["n", "x"]]
    assert instances[0]["x"].dtype == np.float32 and instances[1]["n"].dtype == np.int32
    assert ms_rest.parse_body(b'{"instances": {"x": 1}, "ignored": 2}')[0]["x"].item() == 1


def test_a_bad_value_is_a_parse_failure_of_the_request() -> None:
    with pytest.raises(ServingError) as caught:
        ms_rest.parse_body(b'{"instances": [{"x": 1}, {"x": null}]}')
    assert caught.value.message == "Parser request failed, json value is null, it is not supported"


def outputs(y: float) -> dict:
    return {"y": np.array([y], np.float32)}


def test_reply_all_instances_answered() -> None:
    status, body = ms_rest.reply([outputs(1.5), {"y": "text"}])
    assert status == 200 and orjson.loads(body) == {"instances": [{"y": [1.5]}, {"y": "text"}]}


def test_reply_one_instance_failed_is_the_requests_error() -> None:
    status, body = ms_rest.reply([ServingError(ErrorCode.INVALID_ARGUMENT, "bad x")])
    assert status == 400 and orjson.loads(body) == {"error_msg": "bad x"}


def test_reply_the_same_request_failure_everywhere_is_said_once() -> None:
    unavailable = ServingError(ErrorCode.UNAVAILABLE, "not ready")
    status, body = ms_rest.reply([unavailable, ServingError(ErrorCode.UNAVAILABLE, "not ready")])
    assert status == 503 and orjson.loads(body) == {"error_msg": "not ready"}


def test_reply_some_instances_failed_is_200_with_their_errors_in_place() -> None:
    status, body = ms_rest.reply([ServingError(ErrorCode.INTERNAL, "stage raised"), outputs(2.0)])
    assert status == 200 and orjson.loads(body) == {"instances": [{"error_msg": "stage raised"}, {"y": [2.0]}]}


def test_reply_every_instance_failed_differently_keeps_each_error() -> None:
    status, body = ms_rest.reply([ServingError(ErrorCode.INVALID_ARGUMENT, "a"),
                                  ServingError(ErrorCode.INVALID_ARGUMENT, "b")])
    assert status == 400 and orjson.loads(body) == {"instances": [{"error_msg": "a"}, {"error_msg": "b"}]}
