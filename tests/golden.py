"""Seeded fixtures that pin down the original DVT computation.

The data files in ``tests/data/golden`` hold the original state-dict layouts
(``manifests/*.json``), the original models' logits for seeded weights
(``expected_A.npz``) and the original threshold search on seeded exit outputs
(``budget_A.json``). The generators below rebuild the seeded inputs so that
the tests need nothing outside this repository.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
VARIANTS = {
    # name in the fixtures: (model name, feature_reuse, relation_reuse)
    "DVT_T2t_vit_12": ("DVT_T2t_vit_12", True, True),
    "DVT_T2t_vit_14": ("DVT_T2t_vit_14", True, True),
    "DVT_Deit_small": ("DVT_Deit_small", True, True),
    "DVT_T2t_vit_12-nf-wr": ("DVT_T2t_vit_12", False, True),
    "DVT_T2t_vit_12-wf-nr": ("DVT_T2t_vit_12", True, False),
    "DVT_T2t_vit_12-nf-nr": ("DVT_T2t_vit_12", False, False),
}


def load_manifest(variant: str) -> list[tuple[str, tuple[int, ...]]]:
    """The original ``[key, shape]`` list of a variant, in the original key order."""
    with open(GOLDEN_DIR / "manifests" / f"{variant}.json") as f:
        return [(key, tuple(shape)) for key, shape in json.load(f)]


def golden_state_dict(manifest, salt: str) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for every ``(key, shape)``; the same on every machine."""
    state_dict = {}
    for key, shape in manifest:
        shape = tuple(shape)
        draw = np.random.RandomState(zlib.crc32(f"{salt}:{key}".encode())).standard_normal(size=shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "w":  # performer random features keep their sqrt(m) scale
            draw = draw * math.sqrt(shape[0] / shape[1])
        elif "pos_embed" in key or "cls_token" in key:
            draw = draw * 0.02
        elif len(shape) <= 1:
            draw = 1.0 + 0.1 * draw if leaf == "weight" else 0.05 * draw
        else:
            draw = draw / math.sqrt(int(np.prod(shape[1:])))
        state_dict[key] = torch.from_numpy(draw.astype(np.float32))
    return state_dict


def golden_input(seed: int, batch: int, size: int = 224) -> torch.Tensor:
    """Standard-normal images ``(batch, 3, size, size)``."""
    draw = np.random.RandomState(seed).standard_normal(size=(batch, 3, size, size))
    return torch.from_numpy(draw.astype(np.float32))


def synthetic_exit_probs(seed: int, n: int, classes: int, stages: int = 3):
    """Softmax outputs ``(stages, n, classes)`` and targets ``(n,)``; later exits are right more often."""
    rs = np.random.RandomState(seed)
    targets = rs.randint(0, classes, size=n)
    difficulty = rs.uniform(0.0, 1.0, size=n)
    probs = np.empty((stages, n, classes), dtype=np.float32)
    rows = np.arange(n)
    for k in range(stages):
        logits = rs.standard_normal(size=(n, classes))
        logits[rows, targets] += 6.0 * (1.0 + k) / stages * (1.2 - difficulty) + rs.standard_normal(size=n)
        logits -= logits.max(axis=1, keepdims=True)
        expd = np.exp(logits)
        probs[k] = expd / expd.sum(axis=1, keepdims=True)
    return torch.from_numpy(probs), torch.from_numpy(targets)


def load_budget_fixture() -> dict:
    with open(GOLDEN_DIR / "budget_A.json") as f:
        return json.load(f)


def load_expected(name: str = "expected_A.npz") -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / name) as data:
        return {k: data[k] for k in data.files}
