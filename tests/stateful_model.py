"""A tiny stateful two-subgraph model for the generation tests (runtime's own, so they never wait for examples/gpt).

Its "attention" is a sum over the whole history: the state of a sequence holds one embedding per token seen so far
(K) and twice it (V), zeros past its length, exactly the generation contract's layout [L, 2, B, H, M, D] with
L = H = 1. The logits of a call are (sum of every cached V + sum of the new tokens' V) @ W + (position after the
last token) * w_pos, so a token that depends on a wrong, stale or foreign state comes out different: a real test of
where the state lives. `reference_generate` is the same maths in numpy with no state kept anywhere but a list.

Run as a script it exports: `python tests/stateful_model.py OUTPUT_DIR` writes OUTPUT_DIR/device0/tiny_{0,1}.mindir
and group_config.json (with "subgraphs").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

VOCAB, DIM, MAX_LEN = 11, 4, 24
SEED = 11


def weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    embedding = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    out = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    w_pos = rng.standard_normal(VOCAB).astype(np.float32) * 2.0
    return embedding, out, w_pos


def reference_logits(history: list[int]) -> np.ndarray:
    """The next token's logits after `history`, in float64 numpy."""
    embedding, out, w_pos = (w.astype(np.float64) for w in weights())
    return 2 * embedding[history].sum(axis=0) @ out + len(history) * w_pos


def reference_generate(prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy tokens after `prompt`."""
    history = list(prompt)
    generated: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(reference_logits(history)))
        generated.append(token)
        history.append(token)
    return generated


SERVABLE_CONFIG = """
import numpy as np
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=1, stage_size=1, with_batch_dim=False)


def generate_tokens(prompt, max_tokens):
    history = [int(t) for t in prompt]
    logits = model.call(np.array([history], np.int32), np.array([0], np.int32), subgraph=0)
    generated = []
    for step in range(int(max_tokens)):
        token = int(np.argmax(logits[0]))
        generated.append(token)
        if step + 1 < int(max_tokens):
            position = len(history) + step
            logits = model.call(np.array([[token]], np.int32), np.array([position], np.int32), subgraph=1)
    return np.array(generated, np.int32)


def stream_tokens(prompt, max_tokens):
    history = [int(t) for t in prompt]
    logits = model.call(np.array([history], np.int32), np.array([0], np.int32), subgraph=0)
    for step in range(int(max_tokens)):
        token = int(np.argmax(logits[0]))
        yield {"tokens": np.array([token], np.int32)}
        if step + 1 < int(max_tokens):
            logits = model.call(np.array([[token]], np.int32), np.array([len(history) + step], np.int32),
                                subgraph=1)


def spin(prompt, steps):
    # holds its sequence for `steps` decode steps (rewriting one position), to observe slots while it runs
    logits = model.call(np.array([[int(t) for t in prompt]], np.int32), np.array([0], np.int32), subgraph=0)
    for _ in range(int(steps)):
        logits = model.call(np.array([[1]], np.int32), np.array([len(prompt)], np.int32), subgraph=1)
    return np.array([int(np.argmax(logits[0]))], np.int32)


@register.register_method(output_names=["tokens"])
def predict(prompt, max_tokens):
    return register.add_stage(generate_tokens, prompt, max_tokens, outputs_count=1)


@register.register_method(output_names=["tokens"])
def generate(prompt, max_tokens):
    return register.add_stage(stream_tokens, prompt, max_tokens, outputs_count=1)


@register.register_method(output_names=["token"])
def hold(prompt, steps):
    return register.add_stage(spin, prompt, steps, outputs_count=1)
"""
"""A servable over this model: `predict` and `generate` (greedy, PanGu-shaped stages over model.call), `hold`
(keeps its sequence for `steps` decode steps, to observe slots while it runs)."""


def state_entry() -> dict:
    return {"name": "kv", "dtype": "float32", "shape": [1, 2, 1, MAX_LEN, DIM], "batch_axis": 2, "time_axis": 4,
            "update": "kv_new", "positions": "positions"}


def export(output_dir: Path) -> list[Path]:
    import mindspore as ms
    from mindspore import nn, ops

    ms.set_context(mode=ms.GRAPH_MODE)
    embedding, out, w_pos = weights()

    class Tiny(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = ms.Parameter(ms.Tensor(embedding), name="embedding")
            self.out = ms.Parameter(ms.Tensor(out), name="out")
            self.w_pos = ms.Parameter(ms.Tensor(w_pos), name="w_pos")

        def construct(self, tokens, positions, kv):
            new = ops.gather(self.embedding, tokens, 0)  # [B, T, D]
            steps = ops.cast(ops.shape(tokens)[1], ms.float32)
            cached = kv[0, 1].sum(axis=(1, 2))  # [B, D]: every cached V (zeros past the length)
            hidden = cached + 2 * new.sum(axis=1)
            after = ops.cast(positions, ms.float32) + steps
            logits = ops.matmul(hidden, self.out) + ops.expand_dims(after, 1) * self.w_pos
            k = ops.expand_dims(ops.expand_dims(new, 1), 0)  # [1, B, 1, T, D]
            kv_new = ops.expand_dims(ops.concat((k, 2 * k), 0), 0)  # [1, 2, B, 1, T, D]
            return logits, kv_new

    device = output_dir / "device0"
    device.mkdir(parents=True, exist_ok=True)
    cell = Tiny()
    files = []
    for index, steps in enumerate((None, 1)):
        tokens = ms.Tensor(shape=[None, steps], dtype=ms.int32)
        positions = ms.Tensor(shape=[None], dtype=ms.int32)
        kv = ms.Tensor(shape=[1, 2, None, 1, MAX_LEN, DIM], dtype=ms.float32)
        ms.export(cell, tokens, positions, kv, file_name=str(device / f"tiny_{index}"), file_format="MINDIR")
        files.append(device / f"tiny_{index}.mindir")
    subgraphs = [{"file": f.name,
                  "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, -1 if i == 0 else 1]},
                             {"name": "positions", "dtype": "int32", "shape": [-1]}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, VOCAB]}],
                  "state": state_entry()} for i, f in enumerate(files)]
    config = {"rank": 0, "rank_size": 1, "stage": 0, "stage_size": 1, "inputs": subgraphs[0]["inputs"],
              "outputs": subgraphs[0]["outputs"], "subgraphs": subgraphs}
    (device / "group_config.json").write_text(json.dumps(config, indent=2))
    return files



def reference_two_stages(prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of the two-stage variant (`export_two_stages`), prefilling the whole prompt in one call. Each
    stage keeps its own state: stage 0 the embeddings so far, stage 1 twice the hidden states so far."""
    embedding, out, w_pos = (w.astype(np.float64) for w in weights())
    seen_embeddings, seen_hidden = np.zeros(DIM), np.zeros(DIM)
    chunk, position, generated = list(prompt), 0, []
    for _ in range(max_tokens):
        new = embedding[chunk]
        hidden = new + 0.5 * seen_embeddings
        logits = (seen_hidden + 2 * hidden.sum(axis=0)) @ out + (position + len(chunk)) * w_pos
        seen_embeddings += new.sum(axis=0)
        seen_hidden += 2 * hidden.sum(axis=0)
        position += len(chunk)
        chunk = [int(np.argmax(logits))]
        generated.append(chunk[0])
    return generated


def export_two_stages(output_dir: Path) -> None:
    """The same kind of model split over two pipeline stages (rank 0: stage 0, rank 1: stage 1), each with a state of
    its own, so the worker's calls, their sequences and releases cross a stage boundary:
    stage 0: hidden = E[tokens] + 0.5 * (sum of the embeddings it cached); state: the embeddings.
    stage 1: logits = (sum of its cached 2*hidden + 2 * sum of this call's hidden) @ W + (positions + T) * w_pos."""
    import mindspore as ms
    from mindspore import nn, ops

    ms.set_context(mode=ms.GRAPH_MODE)
    embedding, out, w_pos = weights()

    def layout(x):  # [B, T, D] -> [1, 2, B, 1, T, D] with (x, 2x)
        k = ops.expand_dims(ops.expand_dims(x, 1), 0)
        return ops.expand_dims(ops.concat((k, 2 * k), 0), 0)

    class First(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = ms.Parameter(ms.Tensor(embedding), name="embedding")

        def construct(self, tokens, positions, kv):
            new = ops.gather(self.embedding, tokens, 0)
            seen = kv[0, 0].sum(axis=(1, 2))  # [B, D]
            return new + 0.5 * ops.expand_dims(seen, 1), positions + 0, layout(new)

    class Second(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.out = ms.Parameter(ms.Tensor(out), name="out")
            self.w_pos = ms.Parameter(ms.Tensor(w_pos), name="w_pos")

        def construct(self, hidden, positions, kv):
            steps = ops.cast(ops.shape(hidden)[1], ms.float32)
            summed = kv[0, 1].sum(axis=(1, 2)) + 2 * hidden.sum(axis=1)
            after = ops.cast(positions, ms.float32) + steps
            return ops.matmul(summed, self.out) + ops.expand_dims(after, 1) * self.w_pos, layout(hidden)

    position = {"name": "positions", "dtype": "int32", "shape": [-1]}
    for stage, cell in enumerate((First(), Second())):
        device = output_dir / f"device{stage}"
        device.mkdir(parents=True, exist_ok=True)
        subgraphs = []
        for index, steps in enumerate((None, 1)):
            first = ms.Tensor(shape=[None, steps], dtype=ms.int32) if stage == 0 else \
                ms.Tensor(shape=[None, steps, DIM], dtype=ms.float32)
            kv = ms.Tensor(shape=[1, 2, None, 1, MAX_LEN, DIM], dtype=ms.float32)
            name = f"two_{index}"
            ms.export(cell, first, ms.Tensor(shape=[None], dtype=ms.int32), kv, file_name=str(device / name),
                      file_format="MINDIR")
            t = -1 if index == 0 else 1
            hidden = {"name": "hidden", "dtype": "float32", "shape": [-1, t, DIM]}
            inputs = [{"name": "tokens", "dtype": "int32", "shape": [-1, t]} if stage == 0 else hidden, position]
            outputs = [hidden, position] if stage == 0 else \
                [{"name": "logits", "dtype": "float32", "shape": [-1, VOCAB]}]
            subgraphs.append({"file": f"{name}.mindir", "inputs": inputs, "outputs": outputs, "state": state_entry()})
        config = {"rank": stage, "rank_size": 2, "stage": stage, "stage_size": 2, "inputs": subgraphs[0]["inputs"],
                  "outputs": subgraphs[0]["outputs"], "subgraphs": subgraphs}
        (device / "group_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    export(Path(sys.argv[1]))
