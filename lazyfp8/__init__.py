"""lazyfp8: load quantized safetensors checkpoints (FP8, FP4, int4/int8) into PyTorch models, one
tensor at a time.

``LazyFP8View(path, key_mapping=...)`` is a read-only Mapping keyed by the model's runtime names
whose values read and dequantize themselves only when torch copies them into a parameter, so
``model.load_state_dict(view)`` streams with no second copy of the weights.
"""

from .at_rest import Offloaded, offload
from .distributed import LazyFP8StorageReader
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidScaleError,
    KeyMappingError,
    LazyFP8Error,
    MissingScaleError,
    MissingShardError,
    RepoNotCachedError,
    SaveError,
    ScaleShapeError,
    ShardChangedError,
    TensorNotFoundError,
    UnsafePathError,
    UnsupportedDtypeError,
    UnsupportedSchemeError,
)
from .formats.quantize import MXFP4, NVFP4, Int4, NonFiniteError, quantize
from .formats.schemes import PerBlock, PerChannel, PerTensor, Scheme
from .handle import SafeOpen, safe_open
from .keymap import PRESETS, Fuse, KeyMapping, Rule, Split, prefix_rule
from .lazy import LazyTensor
from .load import init_empty_weights, load_into
from .pretrained import from_pretrained
from .view import LazyFP8View, TensorInfo
from .writer import SaveResult, save

__version__ = "0.1.0"

__all__ = [
    # reading
    "LazyFP8View",
    "LazyTensor",
    "TensorInfo",
    "load_into",
    "init_empty_weights",
    "from_pretrained",
    "offload",
    "Offloaded",
    "LazyFP8StorageReader",
    "safe_open",
    "SafeOpen",
    # writing
    "save",
    "SaveResult",
    "quantize",
    # key mapping
    "KeyMapping",
    "Rule",
    "prefix_rule",
    "Fuse",
    "Split",
    "PRESETS",
    # scale granularities
    "PerTensor",
    "PerChannel",
    "PerBlock",
    "Scheme",
    # 4-bit schemes (save(scheme=...))
    "NVFP4",
    "MXFP4",
    "Int4",
    # errors
    "LazyFP8Error",
    "CheckpointError",
    "CorruptCheckpointError",
    "ShardChangedError",
    "MissingShardError",
    "RepoNotCachedError",
    "UnsafePathError",
    "UnsupportedDtypeError",
    "UnsupportedSchemeError",
    "MissingScaleError",
    "ScaleShapeError",
    "InvalidScaleError",
    "KeyMappingError",
    "TensorNotFoundError",
    "NonFiniteError",
    "SaveError",
    "__version__",
]
