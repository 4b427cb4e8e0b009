"""A TensorFlow SavedModel's variables, read without TensorFlow (the ``saved-model`` format's reading
half, see :mod:`convert.formats.saved_model`; here because a SavedModel is a ``tf-ckpt`` template
too, :mod:`.templates`).

Its variables are an ordinary V2 checkpoint (``variables/variables.index`` + ``.data-*``), named as
the SavedModel names its variables (TF2): each by the ``name`` its ``SavedObjectGraph`` node in
``saved_model.pb`` holds, its node matched to the bundle's object graph node as TensorFlow's loader
matches them; else as :mod:`.objects` names checkpoint variables; or by their keys (TF1 SavedModels).
"""

from __future__ import annotations

from pathlib import Path

from ... import wire
from ...errors import CorruptFileError, ReadError
from ...ir import TensorDict
from . import objects
from .bundle import read_bundle
from .roles import named
from .sstable import has_table_magic

NAME = "saved-model"

_PB = "saved_model.pb"


def _root(path: Path) -> Path:
    return path.parent if path.name in (_PB, "saved_model.pbtxt") else path


def detect(path: Path) -> bool:
    root = _root(Path(path))
    return root.is_dir() and ((root / _PB).is_file() or (root / "saved_model.pbtxt").is_file())


def _saved_model_info(pb: Path) -> tuple[dict[str, str], tuple[list, list[str]] | None]:
    """Tags and signature names of each meta graph in ``saved_model.pb`` (for the metadata), and
    its ``SavedObjectGraph``: the nodes' structure (:func:`.objects.parse_object_graph`) and the
    name it gives each node ("" but for variables); from the first meta graph that has one (TF2
    only, else None).

    tensorflow/core/protobuf: ``MetaGraphDef``: meta_info_def = 1 (tags = 4), signature_def = 5,
    object_graph_def = 7; ``SavedObjectGraph.nodes = 1``; ``SavedObject.variable = 7``;
    ``SavedVariable.name = 6``.
    """
    try:
        data = pb.read_bytes()
    except OSError as e:
        raise ReadError(pb, f"cannot read: {e.strerror}") from None
    tags, sigs, names = [], [], None
    try:
        for num, wt, meta_graph in wire.iter_fields(data):
            if num != 2 or wt != wire.BYTES:  # SavedModel.meta_graphs
                continue
            for n, w, v in wire.iter_fields(meta_graph):
                if n == 1 and w == wire.BYTES:  # MetaInfoDef.tags = 4
                    tags += [bytes(t).decode() for k, w2, t in wire.iter_fields(v) if k == 4 and w2 == wire.BYTES]
                elif n == 5 and w == wire.BYTES:  # map<string, SignatureDef> entry: key = 1
                    sigs += [bytes(k_).decode() for k, w2, k_ in wire.iter_fields(v) if k == 1 and w2 == wire.BYTES]
                elif n == 7 and w == wire.BYTES and names is None:
                    names = (objects.parse_object_graph(v), _variable_names(v))
    except (wire.ProtoError, UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(pb, f"not a SavedModel protobuf ({e})") from None
    out = {}
    if tags:
        out["tf.saved_model.tags"] = ",".join(dict.fromkeys(tags))
    if sigs:
        out["tf.saved_model.signatures"] = ",".join(dict.fromkeys(sigs))
    return out, names


def _variable_names(object_graph: wire.Bytes) -> list[str]:
    """Per node of a ``SavedObjectGraph``, its ``SavedVariable.name`` ("" for other nodes)."""
    names = []
    for n, w, node in wire.iter_fields(object_graph):
        if n != 1 or w != wire.BYTES:
            continue
        name = ""
        for k, w2, v in wire.iter_fields(node):
            if k == 7 and w2 == wire.BYTES:
                name = next((bytes(x).decode() for f, w3, x in reversed(list(wire.iter_fields(v)))
                             if f == 6 and w3 == wire.BYTES), "")
        names.append(name)
    return names


def read(path: Path, names: str | None = None) -> TensorDict:
    """The variables of a SavedModel, lazily (see module docstring).

    Args:
        path: the SavedModel directory (or its ``saved_model.pb``).
        names: "readable" (default) or "keys".
    """
    root = _root(Path(path))
    metadata = {"source.format": NAME, "local.tf.saved_model_dir": str(root.resolve())}
    pb = root / _PB
    saved = None
    if pb.is_file():
        info, saved = _saved_model_info(pb)
        metadata.update(info)
    elif not (root / "saved_model.pbtxt").is_file():
        raise ReadError(root, "not a SavedModel: no saved_model.pb")
    prefix = root / "variables" / "variables"
    if not Path(str(prefix) + ".index").is_file():
        if (root / "variables").is_dir() and any((root / "variables").iterdir()):
            raise ReadError(root, "variables/ holds no variables.index")
        return TensorDict((), metadata)  # a SavedModel without variables is valid
    if not has_table_magic(str(prefix) + ".index"):
        raise CorruptFileError(str(prefix) + ".index", "not a checkpoint index (no table magic)")
    tensors, _ = read_bundle(str(prefix))
    return TensorDict(named(tensors, names, str(prefix) + ".index", metadata, saved), metadata)
