"""Checkpoints: safe reading and atomic writing (:mod:`.files`), model weights and the model
rebuilt from any checkpoint (:mod:`.weights`), training save/restore (:mod:`.training`) and the
released format (:mod:`.release`).

::

    from utils.checkpoint import build_from_checkpoint, load_checkpoint, load_checkpoint_file
"""
from .files import atomic_save, load_checkpoint_file
from .weights import build_from_checkpoint, checkpoint_weights, extract_state_dict, load_checkpoint, load_weights

__all__ = ["atomic_save", "build_from_checkpoint", "checkpoint_weights", "extract_state_dict", "load_checkpoint",
           "load_checkpoint_file", "load_weights"]
