"""DVT models. Importing this package registers every cascade in timm."""
from .baseline import SingleExit
from .dvt import DVT, DVTStage, EarlyExitOutput, StageOutput, checkpoint_filter_fn, to_original_state_dict
from .factory import create_cascade, guess_model, is_cascade_name, model_from_checkpoint
from .registry import MODEL_CFGS, build_dvt

__all__ = [
    "DVT", "DVTStage", "EarlyExitOutput", "StageOutput", "MODEL_CFGS", "build_dvt", "model_from_checkpoint",
    "checkpoint_filter_fn", "to_original_state_dict", "SingleExit", "create_cascade", "guess_model",
    "is_cascade_name",
]
