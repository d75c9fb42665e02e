"""The GPT example (examples/gpt) as a text-generation servable, in PanGu-alpha's serving shape: a Python stage that
loops over `model.call`, subgraph 0 (the full graph over the prompt, in chunks) once, then subgraph 1 (one new
token) per token. The K/V cache never leaves the agents: each request holds a sequence slot, and the worker
merges the subgraph-1 calls of every running request into one decode step (continuous batching,
services/worker/steps.py).

Methods (inputs and outputs: the generation contract, section 4):
  predict(prompt, max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed)
      -> token_ids, text, finish_reason, prompt_tokens, completion_tokens        (the whole answer)
  generate(...same...) -> the same, and a streaming request gets one PARTIAL per token: {token_ids, text}
Every input but `prompt` is optional (the defaults of zmserve.sampling.SamplingParams; seed -1 = none).

`predict` is MindSpore Serving's PanGu shape and runs under it with one import line changed (`from
mindspore_serving.server import distributed, register`; examples/gpt/gpt/README.md shows that version next to this
one). `generate` (a generator stage) and optional inputs are zmserve's own.

Files: the export copies this folder next to the model (DIR/gpt/) and writes layout.json (rank_size, stage_size)
beside it; config.json and tokenizer.json are read from beside this file, else from examples/gpt/weights/ (of this
checkout, or of the zmserve checkout this worker runs from).
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

import zmserve
from zmserve.sampling import Sampler, SamplingParams
from zmserve.server import distributed, register

HERE = Path(__file__).resolve().parent


def find(name):
    """Beside this file (a deployed copy), else the example's weights folder (this folder in the repository, or
    a copy made from a checkout, e.g. by the export)."""
    folders = [HERE, HERE.parent / "weights", Path(zmserve.__file__).resolve().parents[1] / "examples" / "gpt" /
               "weights"]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is in none of {', '.join(map(str, folders))}")


LAYOUT = json.loads((HERE / "layout.json").read_text()) if (HERE / "layout.json").is_file() \
    else {"rank_size": 1, "stage_size": 1}
CONFIG = json.loads(find("config.json").read_text())
MAX_LEN = int(CONFIG["max_len"])
EOS = CONFIG.get("eos_token_id")
PREFILL_CHUNK = 32
"""Prompt tokens per subgraph-0 call: a long prompt is prefilled in chunks, one chunk between two decode steps, so it
never stalls the sequences already generating for long."""
DEFAULTS = SamplingParams()
tokenizer = Tokenizer.from_file(str(find("tokenizer.json")))

model = distributed.declare_servable(rank_size=LAYOUT["rank_size"], stage_size=LAYOUT["stage_size"],
                                     with_batch_dim=False)


def sampling(max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed):
    """The request's sampling values (a value out of range: ValueError, which answers INVALID_ARGUMENT)."""
    seed = int(seed)
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_k=int(top_k),
                          top_p=float(top_p), frequency_penalty=float(frequency_penalty),
                          presence_penalty=float(presence_penalty), seed=None if seed < 0 else seed)


def encode_prompt(prompt):
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = tokenizer.encode(prompt).ids
    if not 0 < len(ids) <= MAX_LEN:
        raise ValueError(f"the prompt has {len(ids)} tokens: the model takes 1 to {MAX_LEN}")
    return ids


def tokens(ids, params):
    """Each next token of the sequence: prefill (subgraph 0, in chunks), then one decode call (subgraph 1) per token.
    Returns why it stopped: "stop" at the end-of-text token (not yielded), "length" after max_tokens or when the
    context (max_len positions) is full, as examples/gpt/reference.py does."""
    sampler = Sampler(params)
    for start in range(0, len(ids), PREFILL_CHUNK):
        chunk = ids[start:start + PREFILL_CHUNK]
        logits = model.call(np.array([chunk], np.int32), np.array([start], np.int32), subgraph=0)
    generated = []
    while len(generated) < params.max_tokens and len(ids) + len(generated) < MAX_LEN:
        if generated:
            position = len(ids) + len(generated) - 1
            logits = model.call(np.array([[generated[-1]]], np.int32), np.array([position], np.int32), subgraph=1)
        token = sampler.next_token(logits[0], generated)
        if token == EOS:
            return "stop"
        generated.append(token)
        yield token
    return "length"


class TextSoFar:
    """The text of the tokens so far, handed out as new pieces; a piece that ends inside a UTF-8 character waits
    for the token that completes it (byte-level tokenizers split characters)."""

    def __init__(self):
        self.ids, self.sent = [], ""

    def add(self, token):
        self.ids.append(token)
        text = tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def answer(prompt_ids, generated, finish):
    return (np.array(generated, np.int32), tokenizer.decode(generated), finish, np.array(len(prompt_ids), np.int32),
            np.array(len(generated), np.int32))


def generate_whole(prompt, max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed):
    params = sampling(max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed)
    ids = encode_prompt(prompt)
    steps, generated = tokens(ids, params), []
    while True:
        try:
            generated.append(next(steps))
        except StopIteration as stop:
            return answer(ids, generated, stop.value)


def generate_stream(prompt, max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed):
    params = sampling(max_tokens, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed)
    ids = encode_prompt(prompt)
    steps, text = tokens(ids, params), TextSoFar()
    while True:
        try:
            token = next(steps)
        except StopIteration as stop:
            return answer(ids, text.ids, stop.value)
        yield {"token_ids": np.array([token], np.int32), "text": text.add(token)}


OUTPUTS = ["token_ids", "text", "finish_reason", "prompt_tokens", "completion_tokens"]


@register.register_method(output_names=OUTPUTS)
def predict(prompt, max_tokens=DEFAULTS.max_tokens, temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k,
            top_p=DEFAULTS.top_p, frequency_penalty=DEFAULTS.frequency_penalty,
            presence_penalty=DEFAULTS.presence_penalty, seed=-1):
    return register.add_stage(generate_whole, prompt, max_tokens, temperature, top_k, top_p, frequency_penalty,
                              presence_penalty, seed, outputs_count=5)


@register.register_method(output_names=OUTPUTS)
def generate(prompt, max_tokens=DEFAULTS.max_tokens, temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k,
             top_p=DEFAULTS.top_p, frequency_penalty=DEFAULTS.frequency_penalty,
             presence_penalty=DEFAULTS.presence_penalty, seed=-1):
    return register.add_stage(generate_stream, prompt, max_tokens, temperature, top_k, top_p, frequency_penalty,
                              presence_penalty, seed, outputs_count=5)
