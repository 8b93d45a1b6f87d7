"""DVT models. Importing this package registers every cascade in timm."""
from .dvt import DVT, DVTStage, EarlyExitOutput, StageOutput, checkpoint_filter_fn, to_original_state_dict
from .registry import MODEL_CFGS, build_dvt, model_from_checkpoint
from .baseline import SingleExit, create_cascade, is_cascade_name

__all__ = [
    "DVT", "DVTStage", "EarlyExitOutput", "StageOutput", "MODEL_CFGS", "build_dvt", "model_from_checkpoint",
    "checkpoint_filter_fn", "to_original_state_dict", "SingleExit", "create_cascade", "is_cascade_name",
]
