"""Ask the served all-MiniLM-L6-v2 for sentence embeddings and print the cosine similarity of a few pairs.

The embeddings come back L2-normalised, so a dot product is the cosine similarity.

    python client.py        # with the broker on 127.0.0.1:5500 and the minilm servable running
"""

from __future__ import annotations

import numpy as np

from zmserve.client import Client

PAIRS = [
    ("A cat sits on the mat.", "A kitten is lying on a rug."),
    ("A cat sits on the mat.", "The stock market fell sharply today."),
    ("How do I reset my password?", "I forgot my login credentials."),
    ("Grüße aus Köln", "Greetings from Cologne"),
]


def main() -> None:
    with Client("127.0.0.1:5500", "minilm", "embed") as client:
        texts = sorted({text for pair in PAIRS for text in pair})
        results = client.infer([{"text": text} for text in texts], timeout=60)
        embeddings = {text: np.asarray(result["embedding"]) for text, result in zip(texts, results, strict=True)}
    for first, second in PAIRS:
        print(f"{float(embeddings[first] @ embeddings[second]):+.4f}  {first!r} ~ {second!r}")


if __name__ == "__main__":
    main()
