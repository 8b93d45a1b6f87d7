"""Writing Hub-style model folders: ``config.json`` + ``model.safetensors``, the layout timm
reads with ``timm.create_model("local-dir:PATH")`` and ``"hf-hub:ORG/NAME"`` (read back by
:mod:`utils.checkpoint.model_folder`, through :func:`utils.checkpoint.files.load_checkpoint_file`).

``config.json`` follows timm's layout (``architecture``, ``num_classes``, ``num_features``,
``pretrained_cfg`` with the input size, interpolation, crop, mean/std and ``label_names``,
``model_args`` with the constructor arguments such as the reuse switches) and adds a ``dvt``
section with what the released ``.pth.tar`` files carry besides weights: per-exit GFLOPs,
anytime accuracy, the thresholds of the stored budgets and the budget table.
``model.safetensors`` holds the weights in this project's key layout.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from ..budget.choice import as_plain
from ..errors import CheckpointError, CheckpointWriteError
from .files import default_file_mode, os_error_in
from .model_folder import CONFIG_FILE, RESULT_KEYS, WEIGHTS_FILE
from .weights import unwrap_model

FOLDER_FORMAT = "dvt-hub-1"
# pretrained_cfg entries that describe the saved weights and their preprocessing.
_CFG_KEYS = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
             "num_classes", "pool_size", "first_conv", "classifier", "paper_name", "paper_ids")


def model_config(model: nn.Module, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of ``model`` (a cascade built from ``checkpoint``, weights loaded),
    with the results ``checkpoint`` stores (see :data:`RESULT_KEYS`) and its class names."""
    plain = unwrap_model(model)
    cfg = dict(getattr(plain, "pretrained_cfg", None) or {})
    pretrained_cfg = {k: as_plain(cfg[k]) for k in _CFG_KEYS if cfg.get(k) is not None}
    pretrained_cfg["num_classes"] = plain.num_classes
    if getattr(plain, "img_size", None):  # the token grids fix the input size
        pretrained_cfg["input_size"] = [pretrained_cfg.get("input_size", [3])[0], plain.img_size, plain.img_size]
    names = cfg.get("label_names") or checkpoint.get("class_names")
    config: dict[str, Any] = {
        "architecture": plain.model_name,
        "num_classes": plain.num_classes,
        "num_features": getattr(plain, "num_features", None),
        "pretrained_cfg": pretrained_cfg,
        "model_args": as_plain(dict(getattr(plain, "model_kwargs", {}))),
    }
    if names:
        config["label_names"] = list(names)
    config["dvt"] = {"format": FOLDER_FORMAT, "num_exits": plain.num_exits,
                     **{k: as_plain(checkpoint[k]) for k in RESULT_KEYS if checkpoint.get(k) is not None}}
    return config


def save_model_folder(model: nn.Module, checkpoint: Mapping[str, Any], folder: str | os.PathLike,
                      overwrite: bool = False) -> Path:
    """Write ``folder`` with ``config.json`` and ``model.safetensors`` for ``model`` (see
    :func:`model_config`). The folder is written next to its final place and renamed into it,
    so a reader never sees half of it.

    Raises:
        CheckpointError: ``folder`` exists and is not empty, unless ``overwrite``.
        CheckpointWriteError: the disk refused a write.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise CheckpointError(f"{folder} exists and is not empty; pass another folder (or overwrite it)")
    plain = unwrap_model(model)
    if getattr(plain, "model_name", None) is None:
        raise CheckpointError("the model does not record its name (model_name); build it with models.create_cascade")
    config = model_config(plain, checkpoint)
    # safetensors stores every tensor on its own: no shared storage, contiguous, on the CPU
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in plain.state_dict().items()}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise CheckpointWriteError(folder, e) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            os.chmod(tmp / name, default_file_mode())
        if folder.exists():
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_in(e)
        if cause is not None:
            raise CheckpointWriteError(folder, cause) from None
        raise
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
