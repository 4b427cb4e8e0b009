"""Writing an ONNX model, weights only or into a template, its bytes produced by hand in protobuf's
canonical order and each tensor's raw bytes streamed (see :mod:`convert.formats.onnx`)."""

from __future__ import annotations

import os
from pathlib import Path

from ... import storage
from ...errors import UsageError, WriteError
from ...ir import Tensor, TensorDict
from ...lazy import np
from ...wire import BYTES, encode_varint, tag
from ..base import WriteReport
from .reader import _EXTERNAL
from .template import _template_model

IR_VERSION = 10
DEFAULT_OPSET = 21
PRODUCER_NAME = "convert"
PRODUCER_VERSION = "1"
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
_BIG_TENSOR = 1 << 20
_BIG_ALIGN = 1 << 16
_SMALL_ALIGN = 64


def _len_field(field: int, n: int) -> bytes:
    """Tag and length of a length-delimited field of ``n`` bytes."""
    return tag(field, BYTES) + encode_varint(n)


def write(td: TensorDict, path: os.PathLike | str, *, template: str | os.PathLike | None = None,
          opset: int | None = None, external_data_threshold: int | None = None,
          external_data_name: str | None = None, graph: bool = False, inputs: list[str] | None = None,
          outputs: list[str] | None = None, check: bool = False) -> WriteReport | None:
    """Write tensors as an ONNX model (weights only, or into a template's graph).

    Args:
        td: the tensors; not modified.
        path: the ``.onnx`` file to create.
        template: an ONNX model whose main-graph initializers are replaced by ``td``.
        opset: default-domain opset of a weights-only model (not with ``template``).
        external_data_threshold: total numeric bytes above which data goes to an
            external file (default 2,000,000,000).
        external_data_name: that file's name, beside ``path`` (default ``<name>.data``).
        graph, inputs, outputs, check: convert the source's TensorFlow graph instead, see
            :func:`convert.formats.onnx.from_tf.write_onnx`.

    Raises:
        WriteError: a template mismatch (all listed), a dtype ONNX cannot hold, an
            empty tensor name, or an I/O failure.

    Example:
        >>> write(TensorDict.from_arrays({"w": np.ones(3, np.float32)}), "w.onnx")  # doctest: +SKIP
    """
    import onnx

    out = storage.as_path(path)  # remote: the RemotePath of an atomic output (one upload)
    remote = isinstance(out, storage.RemotePath)
    if opset is not None and not 1 <= opset <= onnx.defs.onnx_opset_version():
        raise UsageError(f"--opset must be between 1 and {onnx.defs.onnx_opset_version()} (onnx {onnx.__version__}), "
                         f"got {opset}")
    if graph:
        if template is not None:
            raise UsageError("--graph and --template exclude each other")
        if remote:
            raise WriteError(out, "--graph writes ONNX models to local paths only (tf2onnx writes the file)")
        from . import from_tf

        return from_tf.write_onnx(td, out, inputs or [], outputs or [], opset, check)  # type: ignore[arg-type]
    if inputs or outputs or check:
        raise UsageError("--inputs, --outputs and --check apply to ONNX with --graph")
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else int(external_data_threshold)
    if threshold < 0:
        raise UsageError(f"--external-data-threshold must be >= 0, got {threshold}")
    if "" in td:
        raise WriteError(out, "ONNX cannot hold a tensor with an empty name")

    if template is not None:
        if opset is not None:
            raise UsageError("--opset does not apply with --template (the template's opsets are kept)")
        model, tensors = _template_model(td, Path(template), out)  # type: ignore[arg-type]  # names it only
    else:
        model, tensors = _weights_only_model(td, DEFAULT_OPSET if opset is None else int(opset))

    numeric = sum(t.nbytes for t in tensors if t.dtype.kind != "string")
    data_name = None
    if numeric > threshold:
        data_name = external_data_name or f"{out.name}.data"
        if Path(data_name).name != data_name or data_name in ("", ".", "..", out.name):
            raise UsageError(f"--external-data-name must be a plain file name other than the model's, "
                             f"got '{data_name}'")
        if remote:  # the data file is an object beside the model, outside the output being written
            raise WriteError(out, f"ONNX models with external data (over --external-data-threshold, {threshold} "
                                  "bytes) are written to local paths only; remote models are written inline")
    _emit(model, tensors, out, data_name, onnx)  # type: ignore[arg-type]
    return None


def _weights_only_model(td: TensorDict, opset: int):
    import onnx

    model = onnx.ModelProto(ir_version=IR_VERSION, producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION)
    model.opset_import.add(domain="", version=opset)
    model.graph.name = "weights"
    for t in td.values():
        vi = model.graph.output.add()
        vi.name = t.name
        tt = vi.type.tensor_type
        tt.elem_type = t.dtype.onnx
        tt.shape.SetInParent()
        for d in t.shape:
            tt.shape.dim.add().dim_value = d
    for key, value in td.portable_metadata.items():
        if key.startswith("onnx.meta."):
            key = key.removeprefix("onnx.meta.")
        elif key.startswith("onnx."):
            continue
        model.metadata_props.add(key=key, value=value)
    return model, list(td.values())


def _emit(model, tensors: list[Tensor], out: Path, data_name: str | None, onnx) -> None:
    """Write ``model`` with ``tensors`` as its main graph's initializers, streaming their bytes.

    Protobuf's canonical order is kept (model fields 1-6, graph, 8+; graph fields
    node and name, initializers, 10+; tensor fields 1-8, raw_data 9, 13-14) so the
    bytes equal ``onnx.save`` of the same model.
    """
    graph_head = onnx.GraphProto()
    graph_head.node.extend(model.graph.node)
    graph_head.name = model.graph.name
    graph_tail = onnx.GraphProto()
    graph_tail.CopyFrom(model.graph)
    del graph_tail.node[:]
    graph_tail.ClearField("name")
    del graph_tail.initializer[:]
    model_head = onnx.ModelProto()
    model_tail = onnx.ModelProto()
    model_tail.CopyFrom(model)
    model_tail.ClearField("graph")
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(field):
            setattr(model_head, field, getattr(model, field))
            model_tail.ClearField(field)

    # Plan: each tensor's serialized header, its raw byte count, its tail (external fields).
    plans: list[tuple[Tensor, bytes, tuple[str, int, int] | None, bytes]] = []
    data_offset = 0
    for t in tensors:
        proto = onnx.TensorProto(name=t.name, data_type=t.dtype.onnx, dims=list(t.shape))
        if t.dtype.kind == "string":
            proto.string_data.extend(t.numpy().reshape(-1).tolist())
            plans.append((t, _ser(proto), None, b""))
            continue
        nbytes = t.nbytes
        if data_name is not None and nbytes > 0:
            align = _BIG_ALIGN if nbytes >= _BIG_TENSOR else _SMALL_ALIGN
            data_offset = -(-data_offset // align) * align
            tail = onnx.TensorProto()
            for key, value in (("location", data_name), ("offset", str(data_offset)), ("length", str(nbytes))):
                tail.external_data.add(key=key, value=value)
            tail.data_location = _EXTERNAL
            plans.append((t, _ser(proto), ("external", data_offset, nbytes), _ser(tail)))
            data_offset += nbytes
        else:
            plans.append((t, _ser(proto), ("inline", 0, nbytes), b""))

    def tensor_len(plan) -> int:
        _, head, where, tail = plan
        n = len(head) + len(tail)
        if where is not None and where[0] == "inline":
            n += len(_len_field(9, where[2])) + where[2]
        return n

    graph_head_b, graph_tail_b = _ser(graph_head), _ser(graph_tail)
    graph_len = len(graph_head_b) + len(graph_tail_b) + sum(
        len(_len_field(5, tensor_len(p))) + tensor_len(p) for p in plans)

    data_path = None if data_name is None else out.parent / data_name
    try:
        with out.open("wb") if isinstance(out, storage.RemotePath) else open(out, "xb") as f:
            f.write(_ser(model_head))
            f.write(_len_field(7, graph_len))
            f.write(graph_head_b)
            for plan in plans:
                t, head, where, tail = plan
                f.write(_len_field(5, tensor_len(plan)))
                f.write(head)
                if where is not None and where[0] == "inline":
                    f.write(_len_field(9, where[2]))
                    _copy(t, f, where[2], out)
                f.write(tail)
            f.write(graph_tail_b)
            f.write(_ser(model_tail))
        if data_path is not None:
            with open(data_path, "xb") as d:
                for t, _, where, _ in plans:
                    if where is not None and where[0] == "external":
                        d.write(b"\0" * (where[1] - d.tell()))
                        _copy(t, d, where[2], data_path)
    except FileExistsError as e:
        raise WriteError(e.filename, "already exists") from None


def _ser(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def _copy(t: Tensor, f, nbytes: int, where: Path) -> None:
    written = 0
    for piece in t.chunks():
        if isinstance(piece, np.ndarray):
            piece = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        f.write(piece)
        written += len(piece)
    if written != nbytes:
        raise WriteError(where, f"source produced {written} bytes, expected {nbytes}", t.name)
