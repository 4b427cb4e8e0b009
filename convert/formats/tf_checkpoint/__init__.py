"""TensorFlow checkpoints, V1 and V2, read and written without TensorFlow.

Formats:

* V2 ("tensor bundle", TF >= 0.12 default): ``prefix.index`` + ``prefix.data-0000K-of-0000N``
  (:mod:`.bundle`; spec: tensorflow/core/util/tensor_bundle/tensor_bundle.h).
* V1 (``SavedTensorSlices``): one table file such as ``model.ckpt`` or
  ``export-00000-of-00001`` (:mod:`.slices`; spec: tensorflow/core/util/tensor_slice_writer.h).
* The ``checkpoint`` state file naming the latest and the retained checkpoints (:mod:`.state`).

Both containers are LevelDB tables (:mod:`.sstable`) holding a few protobuf messages
(:mod:`.protowire`). TensorFlow's classes for them ship only inside the ``tensorflow``
package, so everything here is written by hand against the published formats, and
tested against TensorFlow 2.21 as the oracle.

``read`` accepts a directory with a ``checkpoint`` state file (its latest checkpoint, as
``tf.train.latest_checkpoint``; ``step=N`` picks a retained one), a prefix
(``dir/my-model-190``), an ``.index``, ``.data-*`` or ``.meta`` file, or a V1 file.
``write`` creates a directory holding a one-shard V2 checkpoint, a ``checkpoint`` state
file and, when the source had one, the ``.meta`` graph, so that
``saver = tf.compat.v1.train.import_meta_graph(meta); saver.restore(sess, tf.train.latest_checkpoint(dir))``
works on the result. ``write_v1`` writes the V1 format the same way.

Remote checkpoints (URLs, :mod:`convert.storage`): V2 only. A remote folder is read through its
``checkpoint`` state file, which is required there (no lone-``.index`` fallback: our writer
completes it last, so a folder without one is an unfinished output); a prefix or ``.index`` in
such a folder may be named too. A remote output is written as uploads, the ``checkpoint`` state
file (``Writer.commit``) completed after every other file.

Example:
    >>> from convert.formats import tf_checkpoint
    >>> td = tf_checkpoint.read("examples/model1")            # latest checkpoint
    >>> td["conv1/w"].attrs["role"], td["conv1/w/Adam"].attrs["role"], td.metadata["tf.global_step"]
    ('weight', 'optimizer', '190')
    >>> tf_checkpoint.write(td, "/tmp/migrated")              # V2, + checkpoint + .meta
"""


from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import dtypes, storage
from ...errors import ConvertError, UsageError, WriteError
from ...ir import Tensor, TensorDict
from ..base import Format, Option, ShardWriter, Writer, WriteReport
from . import metagraph, objects, templates
from .bundle import bundle_index_bytes, data_path, write_bundle, write_data_shard
from .reading import NAME, Located, detect, expand, locate, read
from .roles import named, role_of
from .slices import GET_TENSOR_REFUSES_V1, check_v1_dtypes, write_v1_file
from .state import STATE_FILE, format_state

DEFAULT_PREFIX = "model.ckpt"


# ------------------------------------------------------------------ write

def _prefix_for(td: TensorDict) -> str:
    prefix = td.metadata.get("tf.prefix") or DEFAULT_PREFIX
    if prefix in (".", "..") or "/" in prefix or "\\" in prefix or "\x00" in prefix:
        return DEFAULT_PREFIX
    return prefix


def _write_checkpoints(tds: Sequence[TensorDict], path: os.PathLike | str, opts: dict,
                       write_files: Callable[[TensorDict, Any], None], version: int,
                       meta_graph: bool = True) -> WriteReport:
    """A new directory at ``path`` with one checkpoint per TensorDict, named after its
    ``tf.prefix``, each with its ``.meta`` graph when known, ``meta_graph`` and it fits
    (:func:`.metagraph.meta_for`), and a ``checkpoint`` state file listing them all, the last
    as the latest. Returns notes on graphs left out or rewritten."""
    if opts:
        raise UsageError(f"tf-ckpt writer does not take option(s) {', '.join(sorted(opts))}")
    out = storage.as_path(path)  # remote: the RemotePath of outputs.atomic_output, each file an upload
    remote = isinstance(out, storage.RemotePath)
    prefixes = [_prefix_for(td) for td in tds]
    if len(set(prefixes)) != len(prefixes):
        raise WriteError(out, f"two checkpoints would have the same prefix: {', '.join(prefixes)}")
    metas = [metagraph.meta_for(td, version, partial=templates.TEMPLATE_KEY in td.metadata) if meta_graph
             else (None, None) for td in tds]
    try:
        out.mkdir()
    except FileExistsError:
        raise WriteError(out, "already exists") from None
    for td, prefix, (meta, _) in zip(tds, prefixes, metas, strict=True):
        write_files(td, out / prefix if remote else str(out / prefix))
        if meta is not None:
            (out / (prefix + ".meta")).write_bytes(meta)
    (out / STATE_FILE).write_text(format_state(prefixes[-1], prefixes))
    notes = list(dict.fromkeys(note for _, note in metas if note))
    return {"notes": notes} if notes else {}


def write(td: TensorDict, path: os.PathLike | str, object_graph: bool = False, **opts: Any) -> WriteReport:
    """Write a V2 checkpoint directory at ``path`` (which must not exist).

    It holds ``<prefix>.index``, ``<prefix>.data-00000-of-00001``, a ``checkpoint`` state
    file and, when ``td.metadata["local.tf.meta_graph_path"]`` names an existing file, that
    graph as ``<prefix>.meta`` when it can restore the checkpoint (:mod:`.metagraph`: carried
    over, or its saver rewritten for V2). ``prefix`` is ``td.metadata["tf.prefix"]`` or
    ``model.ckpt``. Tensors are streamed one by one; the bytes depend only on ``td``. With
    ``object_graph``, a TF2 object-based checkpoint instead (see :func:`.objects.object_based`).
    With ``template`` (and ``template_fill``), the names are resolved against a template's
    variables and its graph is written (:mod:`.templates`).
    """
    return write_steps([td], path, object_graph, **opts)


def _prepared(tds: Sequence[TensorDict], opts: dict, object_graph: bool = False) -> list[TensorDict]:
    """``tds`` resolved against ``opts``' template, when a caller did not :func:`.templates.prepare` them."""
    template, fill = opts.pop("template", None), opts.pop("template_fill", False)
    return [templates.prepare(td, template, fill, object_graph)[0] for td in tds]


def write_steps(tds: Sequence[TensorDict], path: os.PathLike | str, object_graph: bool = False,
                **opts: Any) -> WriteReport:
    """Several V2 checkpoints (``--all-steps``) in one directory, as :func:`write` writes one;
    the state file lists them all, so ``tf.train.latest_checkpoint`` finds the last."""
    tds = _prepared(tds, opts, object_graph)

    def write_files(td: TensorDict, prefix: Any) -> None:
        tensors = objects.object_based(list(td.values()), str(prefix)) if object_graph else td.values()
        write_bundle(tensors, prefix)

    # a TF1 graph does not go with object-based keys
    return _write_checkpoints(tds, path, opts, write_files, 2, meta_graph=not object_graph)


def write_v1(td: TensorDict, path: os.PathLike | str, **opts: Any) -> WriteReport:
    """Write a V1 checkpoint directory at ``path``: the ``<prefix>`` table file, a
    ``checkpoint`` state file and the ``.meta`` graph when known (see :func:`write`).

    V1 cannot hold bfloat16, float8, uint32 or uint64 (TensorFlow refuses them); such
    tensors raise one :class:`WriteError` listing them all.
    """
    return write_steps_v1([td], path, **opts)


def write_steps_v1(tds: Sequence[TensorDict], path: os.PathLike | str, **opts: Any) -> WriteReport:
    """Several V1 checkpoints in one directory (see :func:`write_steps`)."""
    if storage.is_remote(path):
        raise WriteError(path, "V1 checkpoints are written to local paths only; write V2 (tf-ckpt) to remote storage")
    tds = _prepared(tds, opts)
    for td in tds:
        check_v1_dtypes(list(td.values()), path)
    report = _write_checkpoints(tds, path, opts, lambda td, prefix: write_v1_file(list(td.values()), prefix), 1)
    unreadable = list(dict.fromkeys(t.name for td in tds for t in td.values() if t.dtype.name in GET_TENSOR_REFUSES_V1))
    if unreadable:
        report.setdefault("notes", []).append(
            f"TensorFlow's Saver.restore and RestoreV2/RestoreSlice read every tensor written, but its "
            f"tf.train.load_checkpoint(...).get_tensor refuses V1 {', '.join(GET_TENSOR_REFUSES_V1)} tensors "
            f"('Data type not supported'): {', '.join(unreadable)}; a V2 checkpoint (tf-ckpt) has no such gap")
    return report


def read_back(path: Path, write_options: Mapping[str, object]) -> list[TensorDict]:
    """What verification compares with what was written: every checkpoint of the output folder,
    named as written (raw keys, unless the writer made the keys itself from readable names)."""
    names = "readable" if write_options.get("object_graph") else "keys"
    return [read(p, names=names) for _, p in expand(path, all_steps=True)]


# --split shards (convert.split): data shards written in parallel, then the .index, then 'checkpoint'
def _shard_name(td: TensorDict, k: int, n: int) -> str:
    return os.path.basename(data_path(_prefix_for(td), k, n))


def _write_shard(tensors: Sequence[Tensor], path: Path, td: TensorDict) -> list:
    return write_data_shard(list(tensors), path if isinstance(path, storage.RemotePath) else str(path))


def _commit(td: TensorDict, shards: Sequence[tuple[str, Sequence[tuple[Tensor, list]]]]) -> list[tuple[str, bytes]]:
    prefix = _prefix_for(td)
    shard_of = {t.name: k for k, (_, tensors) in enumerate(shards) for t, _ in tensors}
    placed = [(t, entry) for _, tensors in shards for t, entry in tensors]
    index = bundle_index_bytes(placed, len(shards), shard_of.__getitem__)
    return [(prefix + ".index", index), (STATE_FILE, format_state(prefix, [prefix]).encode("utf-8"))]


FORMAT = Format(
    name=NAME,
    description="TensorFlow checkpoint, V1 or V2 (dir with 'checkpoint', prefix, .index, V1 file); writes V2",
    detect=detect,
    read=read,
    writers=(
        Writer("v2", write, dtypes.held_by("tf"), series=write_steps, read_back=read_back,
               prepare=templates.prepare, takes_template=templates.accepts_template,
               shards=ShardWriter(_shard_name, _write_shard, _commit), commit=(STATE_FILE,),
               description="a folder with a V2 checkpoint, its 'checkpoint' state file and the .meta graph"),
        Writer("v1", write_v1, dtypes.held_by("tf_v1"), series=write_steps_v1, read_back=read_back,
               prepare=templates.prepare, takes_template=templates.accepts_template,
               description="the V1 format (SavedTensorSlices), for legacy consumers"),
    ),
    options=(
        Option("--step", "read", int, "read the retained checkpoint of this global step "
               "(from the directory's 'checkpoint' state file) instead of the latest"),
        Option("--all-steps", "read", bool, "convert every checkpoint the 'checkpoint' state file retains"),
        objects.NAMES_OPTION,
        objects.OBJECT_GRAPH_OPTION,
        *templates.OPTIONS,
    ),
    expand=expand,
    suffixes=(".index",),
    name_endings=(r"\.data-\d+-of-\d+", r"\.ckpt"),
    checksums="V2: CRC-32C of every tensor and of every index block; V1: CRC-32C of every table block",
    remote=True,
)

__all__ = ["NAME", "FORMAT", "detect", "read", "named", "write", "write_v1", "write_steps", "write_steps_v1", "expand",
           "locate", "role_of", "Located", "ConvertError"]
