"""ONNX models: every weight in, weights (or a template's graph with new weights) out.

Spec: https://github.com/onnx/onnx/blob/main/docs/IR.md (the ``ModelProto`` in
onnx/onnx.proto) and https://github.com/onnx/onnx/blob/main/docs/ExternalData.md.

Reading
    Every tensor the model holds, wherever it lives:

    ========================  ==========================  =====================================
    where                     tensor name                 ``attrs["origin"]``
    ========================  ==========================  =====================================
    graph initializers        the initializer name        ``initializer``
    sparse initializers       the values tensor's name    ``sparse_initializer`` (made dense)
    ``Constant`` nodes        the node's output name      ``constant`` (``value``, ``sparse_value``,
                                                          ``value_float(s)``, ``value_int(s)``,
                                                          ``value_string(s)``)
    subgraphs of If/Loop/Scan the same rules, recursively ``subgraph:<node name>/<attribute>``
    model-local functions     ``<function>/<output>``     ``function:<domain>.<name>``
    external data             (as above)                  ``external:<file>`` (overrides the above)
    ========================  ==========================  =====================================

    ``attrs["onnx.kind"]`` keeps ``initializer`` / ``constant`` / ``sparse_initializer``
    also when ``origin`` says ``external:`` or ``subgraph:``; ``attrs["role"]`` is
    ``weight`` for initializers and ``other`` for Constant nodes (ONNX does not say
    more); ``--initializers-only`` leaves Constant nodes out. Should two tensors share a name (only possible across functions or
    malformed subgraphs), the later one is prefixed by its graph's path.

    Nothing is loaded until a writer asks, and the weights never pass through
    protobuf: the file is first walked field by field (ModelProto -> graph ->
    initializer -> raw_data) to note where each main-graph initializer's ``raw_data``
    sits, and protobuf parses the rest (the structure) once; that parsed proto stays
    referenced by the lazy tensors. So external data *and* inline raw data become
    :class:`~convert.ir.FileRegion` s (copied byte for byte, memory independent of the
    model: a 400 MB inline model reads in 88 MB peak RSS instead of 840 MB). Tensors
    elsewhere (Constant nodes, subgraphs) or in typed fields (``float_data``,
    ``int32_data`` for 16/8-bit types and bool, ``int64_data``...) become
    :class:`~convert.ir.ArraySource` s decoded by ``onnx.numpy_helper.to_array``;
    strings are taken from ``string_data`` as bytes (``to_array`` would decode UTF-8).

    Metadata: ``source.format`` = ``onnx``, ``onnx.ir_version``, ``onnx.producer``,
    ``onnx.producer_version``, ``onnx.opset`` (default domain), ``onnx.opset.<domain>``,
    ``onnx.graph_name``, and each ``metadata_props`` entry as ``onnx.meta.<key>``.

Writing without a template
    A weights-only model: a graph named ``weights`` with no nodes, one initializer per
    tensor, and every initializer also listed as a graph output (with its type and
    shape). ``onnx.checker.check_model(full_check=True)`` accepts it, and onnxruntime
    loads it and returns the weights as outputs (without outputs the checker is
    content too, but onnxruntime drops unused initializers and then refuses the
    model). IR version 10, opset 21 unless ``--opset``; producer ``convert``
    ``1`` (fixed: no timestamps, no version string that changes the bytes).
    Metadata goes to ``metadata_props`` (``onnx.meta.K`` back to ``K``; the other
    ``onnx.*`` keys describe the file being written and are not copied).

    Bytes are produced by hand in protobuf's canonical field order, so the result
    equals ``onnx.save`` of the same model, but each tensor's raw bytes are streamed
    from ``Tensor.chunks()``: memory stays of the order of one chunk, not the model.

    External data: when the numeric tensors total more than
    ``--external-data-threshold`` bytes (default 2,000,000,000: protobuf cannot
    parse a file over 2 GiB), every non-empty numeric tensor goes to one data file
    beside the model (``--external-data-name``, default ``<output name>.data``),
    tensors of 1 MiB and more at offsets aligned to 64 KiB (mmap granularity on
    every OS), the others to 64 bytes. Strings always stay inline (ONNX cannot
    store them externally). ``path`` already has its final name (convert.fileio's
    atomic writer stages the model and its data file together in a hidden folder and
    moves both into place), so the location recorded in the model stays right.
    Writing 400 MB, inline or external, peaks at 70 MB RSS.

Writing with a template (``--template graph.onnx``)
    The template's model is copied, and the initializers of its main graph (and only
    those) are replaced by the source tensors, resolved onto the initializers' names by
    :func:`convert.template.resolve` (the same engine as tf-ckpt's ``--template``: exact
    name, then naming conventions, then a unique dtype and shape within a scope). Every
    template initializer must be present with the same dtype and shape, and every source
    tensor must be a template initializer: missing, mismatched, ambiguous *and extra* tensors
    are all listed in one :class:`~convert.errors.WriteError` (extra ones are an
    error because silently dropping a weight hides mapping mistakes; drop them with
    a mapping rule). Source tensors named as :func:`read` names the template's other
    tensors (Constant-node values, subgraph initializers, sparse tensors, function
    constants) go back there, in the form the template had (``value``, ``value_floats``...;
    a sparse tensor keeps its bytes when its values are unchanged, else holds the new
    non-zero entries), so that a round trip of everything ``read`` returned (ONNX ->
    safetensors -> ONNX ``--template``) gives the template's values back; they match by
    exact name only, and a source without them (a state dict) keeps the template's.
    Nodes, opsets, producer and metadata of the template are kept as they are; template
    tensors kept that used external data are loaded inline so the output does not depend
    on the template's files.

Remote paths (``Format.remote``, :mod:`convert.storage`)
    A model in object storage is walked through a read-ahead file of 256 KiB blocks (skipping
    each initializer's ``raw_data`` costs at most a block), its inline and external weights
    (a data file beside the model) are :class:`~convert.storage.RemoteRegion` s. A remote output
    is one upload, written inline (``--external-data-threshold`` over a remote output, and
    ``--graph``, are refused: their files go to local paths); ``--template`` is a local file.
"""

from __future__ import annotations

from ... import dtypes
from ..base import Format, Option, Writer
from ..tf_checkpoint.graph import INPUTS_OPTION, OUTPUTS_OPTION
from .reader import NAME, read
from .template import accepts_template, prepare
from .walk import detect
from .writer import write

FORMAT = Format(
    name=NAME,
    description="ONNX model (weights: initializers, Constant nodes, subgraphs, external data)",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("onnx"), suffix=".onnx", prepare=prepare,
                    takes_template=accepts_template),),
    options=(
        Option("--initializers-only", "read", bool,
               "ONNX: read graph initializers only (also in subgraphs), not Constant-node values"),
        Option("--template", "write", str,
               "ONNX model whose main-graph initializers are replaced by the tensors (names resolved "
               "by the same rules as tf-ckpt's --template; dtypes and shapes must match)"),
        Option("--opset", "write", int, "default-domain opset of the ONNX model (default 21; with --graph, "
               "tf2onnx's default)"),
        Option("--external-data-threshold", "write", int,
               "total tensor bytes above which ONNX data goes to an external file (default 2000000000)"),
        Option("--external-data-name", "write", str,
               "file name of the ONNX external data file, beside the model (default <output name>.data)"),
        Option("--graph", "write", bool, "convert the TensorFlow graph (TF1 checkpoint with .meta, or SavedModel) "
               "to a runnable ONNX model with tf2onnx, instead of writing weights only (needs ckpt-convert[tf])"),
        INPUTS_OPTION,
        OUTPUTS_OPTION,
        Option("--check", "write", bool, "with --graph: run the ONNX model (onnxruntime) and TensorFlow on the same "
               "random inputs and fail unless they agree within 1e-5"),
    ),
    suffixes=(".onnx",),
    remote=True,
)

__all__ = ["NAME", "FORMAT", "detect", "read", "write"]
