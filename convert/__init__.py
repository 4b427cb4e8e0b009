"""convert: move checkpoint weights between TensorFlow, PyTorch, ONNX and safetensors.

Public API::

    td = convert.read("model1/")                 # lazy TensorDict, format detected from content
    convert.write(td, "model1.safetensors", "safetensors")
    convert.convert("model1/", to="safetensors")  # read, select, map, cast, write, verify
    convert.inspect("model.pt")                  # what a file holds, as a dict
"""

from .api import convert, inspect, read, write
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
    "convert", "inspect", "read", "write", "Tensor", "TensorDict",
    "ConvertError", "CorruptFileError", "MappingError", "MissingDependencyError", "ReadError",
    "UnknownFormatError", "UnsupportedDTypeError", "UsageError", "VerificationError", "WriteError",
]
