"""PixelDiT model code: pure single-device PyTorch (no deepspeed, no torch.distributed)."""
from .pixeldit import PixelDiT, build_model
from .sizes import CONDITIONINGS, MODEL_SIZES, ModelArgs, get_model_args

__all__ = ["PixelDiT", "build_model", "MODEL_SIZES", "ModelArgs", "get_model_args", "CONDITIONINGS"]
