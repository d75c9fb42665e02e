"""A servable whose `generate` method is one pure-Python generator stage: a stand-in for a language model with the
generation contract's inputs and outputs, so the streaming path (worker, broker, client, gateway, bench) is tested
on real processes without waiting for a real model. A worker needs a distributed model to serve, so the servable
also declares the rank-1 MatMul (one agent) and its `predict`, which the cluster's readiness check calls.

The "model" completes a prompt with the prompt backwards, one character per token (the token id is its code
point), repeated until `max_tokens` ("length"); a "|" in the reversed text is its end-of-sequence token: the
generation stops there without it ("stop"). So "ab" with max_tokens 5 gives "babab", and "x|yz" gives "zy".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.cluster import export_matmul, write_servable
from zmserve.local import LocalCluster

SERVABLE = "echo"
OUTPUTS = ("token_ids", "text", "finish_reason", "prompt_tokens", "completion_tokens")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
"""The chat template the servable folder holds (`chat_template.jinja`): one line per message."""

CONFIG = '''
import numpy as np

from zmserve.server import InvalidInput, distributed, register

model = distributed.declare_servable(rank_size=1, stage_size=1, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y


def echo_backwards(prompt, max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed):
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInput("prompt must be a non-empty string")
    limit = int(max_tokens)
    if limit < 1:
        raise InvalidInput(f"max_tokens must be at least 1, got {limit}")
    backwards = prompt[::-1]
    tokens, finish = [], "length"
    while len(tokens) < limit:
        char = backwards[len(tokens) % len(backwards)]
        if char == "|":
            finish = "stop"
            break
        tokens.append(ord(char))
        yield {"token_ids": np.array([ord(char)], np.int32), "text": char}
    text = "".join(chr(t) for t in tokens)
    return np.array(tokens, np.int32), text, finish, np.int32(len(prompt)), np.int32(len(tokens))


@register.register_method(output_names=["token_ids", "text", "finish_reason", "prompt_tokens", "completion_tokens"])
def generate(prompt, max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed):
    return register.add_stage(echo_backwards, prompt, max_tokens, temperature, top_k, top_p, frequency_penalty,
                              presence_penalty, seed, outputs_count=5)
'''


def expected(prompt: str, max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) the stand-in model gives: the reference the tests compare against."""
    backwards, text = prompt[::-1], ""
    while len(text) < max_tokens:
        char = backwards[len(text) % len(backwards)]
        if char == "|":
            return text, "stop"
        text += char
    return text, "length"


def worker_cancels(cluster: LocalCluster) -> int:
    """How many requests the worker dropped because they were cancelled (its `request_cancelled` lines; in
    `zmserve serve` the broker's share the file)."""
    return sum(1 for line in cluster.logs["worker"].read_text().splitlines()
               if '"event": "request_cancelled"' in line and '"component": "worker"' in line)


def start(workdir: Path, **options: object) -> LocalCluster:
    """Broker, worker and the one MatMul agent serving the `echo` servable, ready."""
    model_files = export_matmul(workdir, 1)
    servables = write_servable(workdir / "servables", SERVABLE, CONFIG)
    (servables / SERVABLE / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cluster = LocalCluster(workdir, servables, SERVABLE, model_files, **options)  # type: ignore[arg-type]
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
    except BaseException:
        cluster.stop()
        raise
    return cluster
