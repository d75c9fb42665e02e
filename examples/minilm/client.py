"""Ask the served all-MiniLM-L6-v2 for sentence embeddings and print the cosine similarity of a few pairs.

`embed` takes `text`, a string, and returns `embedding`, float32, shape (384,), L2-normalised, so a dot product
is the cosine similarity. While the servable starts the call is made again until it serves; when nothing answers
at the address within 30 s, it says so in one line.

    python client.py [ADDRESS]        # default 127.0.0.1:5500
"""

from __future__ import annotations

import sys

import numpy as np

from zmserve.client import Client, ClientError, infer_when_ready

PAIRS = [
    ("A cat sits on the mat.", "A kitten is lying on a rug."),
    ("A cat sits on the mat.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my login credentials."),
    ("Grüße aus Köln", "Greetings from Cologne"),
]


def main(address: str = "127.0.0.1:5500") -> None:
    texts = sorted({text for pair in PAIRS for text in pair})
    with Client(address, "minilm", "embed") as client:
        results = infer_when_ready(client, [{"text": text} for text in texts], timeout=30,
                                   on_wait=lambda error: print(f"waiting: {error.message}", file=sys.stderr))
    embeddings = {text: np.asarray(result["embedding"]) for text, result in zip(texts, results, strict=True)}
    for first, second in PAIRS:
        print(f"{float(embeddings[first] @ embeddings[second]):+.4f}  {first!r} ~ {second!r}")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:2])
    except ClientError as error:
        sys.exit(f"client.py: {error}")
