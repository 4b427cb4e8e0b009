"""convert: move checkpoint weights between TensorFlow, PyTorch, ONNX and safetensors.

Installed as ``pip install ckpt-convert``; imported as ``convert``. Public API::

    td = convert.read("model1/")                 # lazy TensorDict, format detected from content
    convert.write(td, "model1.safetensors", "safetensors")
    convert.convert("model1/", to="safetensors")  # read, select, map, cast, write, verify
    convert.inspect("model.pt")                  # what a file holds, as a dict
    convert.diff("model1/", "model1.safetensors")  # tensor by tensor: a DiffReport
    convert.mapping.load("tf1-to-torch")         # a rule file or preset (import convert.mapping)
"""

from .api import convert, diff, inspect, read, write
from .errors import (
    ConvertError,
    CorruptFileError,
    MappingError,
    MissingDependencyError,
    ReadError,
    UnknownFormatError,
    UnsupportedDTypeError,
    UsageError,
    VerificationError,
    WriteError,
)
from .ir import Tensor, TensorDict

__version__ = "0.1.0"

__all__ = [
    "convert", "diff", "inspect", "read", "write", "Tensor", "TensorDict",
    "ConvertError", "CorruptFileError", "MappingError", "MissingDependencyError", "ReadError",
    "UnknownFormatError", "UnsupportedDTypeError", "UsageError", "VerificationError", "WriteError",
]
