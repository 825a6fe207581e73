"""u2net_core: the U²-Net model, its checkpoints, transforms, loss and metrics. No Ray here.

Public API:
    build_model(name)                 -> a freshly initialised "u2net" or "u2netp"
    load_weights(model, source)       -> strict load of official / DDP / wrapped checkpoints
    save_weights(model, dest)         -> plain state dict in the official key layout
    get_spec(name), MODELS            -> input size, normalisation and metadata per variant
    deep_supervision_loss(logits, y)  -> (total, fused) as in the paper
    decode_image(bytes, size)         -> S×S uint8 model input, EXIF-oriented
    normalize / probabilities / to_uint8_map   -> the official pre/post-processing
    SODMetrics                        -> MAE, F-measure, E-measure, S-measure, weighted F
"""

from .checkpoint import WeightsMismatchError, load_weights, read_state_dict, save_weights
from .imageio import DecodedImage, ImageDecodeError, decode_image, decode_mask
from .loss import deep_supervision_loss
from .metrics import SODMetrics
from .model import U2Net, u2net, u2netp
from .registry import MODELS, ModelSpec, build_model, get_spec
from .transforms import normalize, probabilities, to_uint8_map

__all__ = [
    "U2Net", "u2net", "u2netp", "build_model", "get_spec", "MODELS", "ModelSpec",
    "load_weights", "save_weights", "read_state_dict", "WeightsMismatchError",
    "deep_supervision_loss", "decode_image", "decode_mask", "DecodedImage", "ImageDecodeError",
    "normalize", "probabilities", "to_uint8_map", "SODMetrics",
]

