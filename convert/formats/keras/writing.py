"""Writing Keras files through h5py.

* ``keras`` (default writer): a Keras 3 ``.weights.h5``. Each tensor goes to its Keras path
  (``layers/conv2d/vars/0``): the one it was read from (``attrs["keras.path"]``, kept through
  renames), the template's (``--template m.keras``: names resolved by :mod:`convert.template`),
  or its name when the name is such a path; anything else to ``layers/<scope>/vars/<i>`` by its
  name's scope, with a note (Keras's ``load_weights`` finds its layers by class-based paths, which
  only a template gives). Every dataset carries its tensor's name as a ``name`` attribute, so
  the file reads back under the names written; Keras ignores it.
* ``keras:keras``: a ``.keras`` zip (as Keras writes it: stored members, fixed dates) of the
  template's ``metadata.json`` and ``config.json`` (and any other member, e.g. assets) with our
  ``model.weights.h5``; it needs ``--template`` (a ``.keras`` file or folder).
* ``keras:legacy``: legacy Keras 2 HDF5 weights (``save_weights("w.h5")``): ``layer_names`` on the
  root, one group per layer (the name's first part) with ``weight_names`` in the tensors' order,
  optimizer state under ``optimizer_weights``; what tf_keras's and Keras 3's legacy
  ``load_weights`` read, layer by layer in order.

Output is deterministic: no timestamps in HDF5 objects (``track_times=False``) or zip members.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from ... import dtypes, storage
from ...errors import ConvertError, UsageError, WriteError
from ...ir import Tensor, TensorDict
from ...template import Resolution, resolve
from ..base import Option, Writer, WriteReport
from . import hdf5, reading

TEMPLATE_KEY = "local.keras.template"
KERAS3_PATH = re.compile(r"(?:.+/)?vars/\d+")
_HELD = {"float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
         "uint32", "uint64", "bool", "complex64", "complex128"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

OPTIONS = (
    Option("--template", "write", str, "resolve the tensors' names against an existing model and write into "
           "its layout: keras: a .keras file or folder (or .weights.h5) whose config and variables are used"),
    Option("--max-shard-size", "write", str, "keras: a folder of Keras 3 sharded weights (model.weights.json and "
           "model_0000N.weights.h5, what load_weights('.../model.weights.json') reads) with shards of at most this size"),
    Option("--template-fill", "write", bool, "with --template: write the template's own values for the "
           "optimizer slots and step counters the source lacks"),
)


def holds(d: dtypes.DType) -> bool:
    return d.name in _HELD


# ------------------------------------------------------------------------------------------- template

def accepts_template(path: os.PathLike | str) -> bool:
    from .detection import detect

    try:
        return detect(Path(path))
    except ConvertError:
        return False


def prepare(td: TensorDict, template: str | os.PathLike | None = None, template_fill: bool = False,
            **_: object) -> tuple[TensorDict, Resolution | None]:
    """``td`` resolved against a Keras template's variables, each tensor given the template's
    Keras path; ``td`` itself without a template or when already resolved against it."""
    if template is None:
        if template_fill:
            raise UsageError("--template-fill needs --template")
        return td, None
    if td.metadata.get(TEMPLATE_KEY) == os.path.abspath(template):
        return td, None
    try:
        tmpl = reading.read(Path(template), None)
    except ConvertError as e:
        raise WriteError(None, f"template: {e}") from None
    if not tmpl.metadata.get("keras.layout", "").startswith(("keras", "folder", "weights", "sharded")):
        raise UsageError(f"template {template} is a legacy Keras HDF5 file; give a Keras 3 .keras or .weights.h5")
    td = _by_keras_path(td, tmpl)
    out, resolution = resolve(td, tmpl, template_name=os.fspath(template), fill=template_fill)
    tensors = [t.with_attrs(**{k: tmpl[t.name].attrs[k] for k in ("keras.path", "keras.layer") if k in tmpl[t.name].attrs})
               for t in out.values()]
    metadata = {**td.metadata, TEMPLATE_KEY: os.path.abspath(template)}
    return out.replace(tensors, metadata), resolution


def _by_keras_path(td: TensorDict, tmpl: TensorDict) -> TensorDict:
    """Tensors read from a Keras 3 file named as the template's variable at the same Keras path
    (class-based paths are the same in every instance of a model; layer names are not), when
    that names no other source tensor."""
    at = {t.attrs.get("keras.path"): t.name for t in tmpl.values() if KERAS3_PATH.fullmatch(t.attrs.get("keras.path", ""))}
    renamed = [t.renamed(at[t.attrs["keras.path"]]) if t.attrs.get("keras.path") in at else t for t in td.values()]
    names = [t.name for t in renamed]
    return td.replace(renamed) if len(set(names)) == len(names) else td


def _prepared(td: TensorDict, template, template_fill: bool) -> TensorDict:
    return prepare(td, template, template_fill)[0]


# ------------------------------------------------------------------------------------------ .weights.h5

def _layout(td: TensorDict, path: Path) -> tuple[list[tuple[Tensor, str]], list[str]]:
    """Each tensor with the HDF5 path it is written to, and the names placed by their scope."""
    placed: list[tuple[Tensor, str]] = []
    guessed: list[str] = []
    taken: dict[str, str] = {}
    counters: dict[str, int] = {}
    for t in td.values():
        where = t.attrs.get("keras.path", "")
        if not KERAS3_PATH.fullmatch(where):
            where = t.name if KERAS3_PATH.fullmatch(t.name) else ""
        if not where:
            scope = t.name.rpartition("/")[0]
            group = f"layers/{scope}/vars" if scope else "vars"
            while True:  # the next index free in that group
                i = counters.get(group, 0)
                counters[group] = i + 1
                where = f"{group}/{i}"
                if where not in taken:
                    break
            guessed.append(t.name)
        if where in taken:
            raise WriteError(path, f"'{t.name}' and '{taken[where]}' would both be written to '{where}'")
        taken[where] = t.name
        placed.append((t, where))
    groups = {w.rsplit("/", 1)[0] for w in taken}
    for where, name in taken.items():
        if where in groups or any(g.startswith(where + "/") for g in groups):
            raise WriteError(path, f"'{name}' at '{where}' is also a group of other tensors")
    return placed, guessed


def _write_datasets(f, placed: list[tuple[Tensor, str]], path: Path, name_attr: bool = True) -> None:
    """One dataset per tensor, its values written one tensor at a time (memory: the largest)."""
    h5py = hdf5.h5py_module()
    for t, where in placed:
        arr = t.numpy()
        group_path, _, key = where.rpartition("/")
        group = _group(f, group_path, h5py)
        try:
            if t.dtype.name == "bfloat16":  # as Keras writes it: 2-byte opaque, attribute dtype=bfloat16
                ds = group.create_dataset(key, data=arr, track_times=False)
                ds.attrs["dtype"] = "bfloat16"
            else:
                ds = group.create_dataset(key, data=arr, track_times=False)
        except (TypeError, ValueError) as e:
            raise WriteError(path, f"h5py cannot store it ({e})", t.name) from None
        if name_attr:
            ds.attrs["name"] = t.name


def _group(f, group_path: str, h5py):
    group = f
    for part in group_path.split("/"):
        if not part:
            continue
        if part not in group:
            gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
            gcpl.set_obj_track_times(False)
            h5py.h5g.create(group.id, part.encode(), gcpl=gcpl)
        group = group[part]
    return group


def _new_file(path: Path):
    h5py = hdf5.h5py_module()
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False) if hasattr(fcpl, "set_obj_track_times") else None
    try:
        fid = h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_EXCL, fcpl=fcpl)
    except (OSError, ValueError) as e:
        raise WriteError(path, f"cannot create ({e})") from None
    return h5py.File(fid)


def _vars_names(f, placed: list[tuple[Tensor, str]]) -> None:
    """The ``name`` attribute Keras puts on each ``vars`` group (the layer's name), from the tensors' names."""
    for t, where in placed:
        group_path = where.rsplit("/", 1)[0]
        group = f[group_path] if group_path else f
        if "name" not in group.attrs:
            layer = t.attrs.get("keras.layer") or t.name.rpartition("/")[0].rpartition("/")[2] or "model"
            group.attrs["name"] = layer


def write_weights_file(td: TensorDict, path: Path) -> list[str]:
    placed, guessed = _layout(td, path)
    with _new_file(path) as f:
        _write_datasets(f, placed, path)
        _vars_names(f, placed)
    return write_weights_notes(guessed)


def _local_only(path) -> None:
    if storage.is_remote(path):  # h5py writes the superblock last: an upload cannot seek back
        raise WriteError(str(path), "Keras files are written to local paths only (read them from remote storage, "
                                    "write them locally)")


def write_weights_notes(guessed: list[str]) -> list[str]:
    if not guessed:
        return []
    return [f"{len(guessed)} tensors have no Keras path (e.g. {', '.join(guessed[:3])}) and were written "
            "under layers/<scope>/vars/<i> by their names; Keras's load_weights finds a model's variables "
            "by class-based paths: give --template m.keras to write into a model's layout"]


def write_weights(td: TensorDict, path: os.PathLike | str, template: str | os.PathLike | None = None,
                  template_fill: bool = False,
                  max_shard_size: str | None = None, **opts) -> WriteReport:
    """Write a Keras 3 ``.weights.h5`` at ``path`` (see the module docstring), or with
    ``max_shard_size`` a folder of sharded weights as Keras 3.9+ writes them."""
    if opts:
        raise UsageError(f"keras writer does not take option(s) {', '.join(sorted(opts))}")
    _local_only(path)
    td = _prepared(td, template, template_fill)
    if max_shard_size is None:
        notes = write_weights_file(td, Path(path))
    else:
        notes = write_sharded(td, Path(path), max_shard_size)
    return {"notes": notes} if notes else {}


def write_sharded(td: TensorDict, folder: Path, max_shard_size: str) -> list[str]:
    """``model.weights.json`` (``weight_map``: each ``/.../vars`` group -> the shards holding its
    variables) and ``model_0000N.weights.h5`` in a new folder, shards filled in order up to the size."""
    import json

    from ...units import parse_size

    limit = parse_size(max_shard_size, "--max-shard-size")
    placed, guessed = _layout(td, folder)
    shards: list[list[tuple[Tensor, str]]] = [[]]
    used = 0
    for t, where in placed:
        if shards[-1] and used + t.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append((t, where))
        used += t.nbytes
    folder.mkdir()
    weight_map: dict[str, list[str]] = {}
    for i, shard in enumerate(shards):
        name = f"model_{i:05d}.weights.h5"
        with _new_file(folder / name) as f:
            _write_datasets(f, shard, folder / name)
            _vars_names(f, shard)
        for _, where in shard:
            files = weight_map.setdefault("/" + where.rsplit("/", 1)[0], [])
            if name not in files:
                files.append(name)
    index = {"metadata": {"total_size": td.nbytes}, "weight_map": weight_map}
    (folder / "model.weights.json").write_text(json.dumps(index, indent=4) + "\n", "utf-8")
    return write_weights_notes(guessed)


# ------------------------------------------------------------------------------------------- .keras

def _template_members(template: Path) -> list[tuple[str, bytes]]:
    """The template's members other than the weights, in its order (config and metadata first when a folder)."""
    if template.is_dir():
        out = []
        for name in (reading.METADATA_MEMBER, reading.CONFIG_MEMBER):
            if (template / name).is_file():
                out.append((name, (template / name).read_bytes()))
        return out
    try:
        with zipfile.ZipFile(template) as zf:
            reading.check_members(zf, template)
            return [(i.filename, zf.read(i)) for i in zf.infolist()
                    if i.filename != reading.WEIGHTS_MEMBER and not i.is_dir()]
    except reading.ZIP_ERRORS as e:
        raise WriteError(None, f"template {template}: not a readable zip archive ({e})") from None


def write_keras(td: TensorDict, path: os.PathLike | str, template: str | os.PathLike | None = None,
                template_fill: bool = False,
                **opts) -> WriteReport:
    """Write a ``.keras`` zip on ``--template`` (see the module docstring)."""
    if opts:
        raise UsageError(f"keras writer does not take option(s) {', '.join(sorted(opts))}")
    _local_only(path)
    out = Path(path)
    if template is None:
        raise UsageError("writing a .keras file needs --template m.keras (its config.json and metadata.json "
                         "describe the model; the weights alone are a .weights.h5: --to keras)")
    td = _prepared(td, template, template_fill)
    tmpl = Path(template)
    if not (tmpl.is_dir() or zipfile.is_zipfile(tmpl)):
        raise UsageError(f"template {template} is not a .keras file or folder (it has no config.json)")
    members = _template_members(tmpl)
    if reading.CONFIG_MEMBER not in {n for n, _ in members}:
        raise UsageError(f"template {template} has no {reading.CONFIG_MEMBER}")
    weights = out.with_name(out.name + ".weights.tmp")
    try:
        notes = write_weights_file(td, weights)
        if notes:
            raise WriteError(out, notes[0])
        with zipfile.ZipFile(out, "x") as zf:
            for name, data in members:
                zf.writestr(zipfile.ZipInfo(name, _ZIP_DATE), data)
            info = zipfile.ZipInfo(reading.WEIGHTS_MEMBER, _ZIP_DATE)
            with open(weights, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                while piece := src.read(16 << 20):
                    dst.write(piece)
    finally:
        weights.unlink(missing_ok=True)
    return {}


# ------------------------------------------------------------------------------------------- legacy

def write_legacy(td: TensorDict, path: os.PathLike | str, **opts) -> WriteReport:
    """Write legacy Keras 2 HDF5 weights at ``path`` (see the module docstring)."""
    if opts:
        raise UsageError(f"keras:legacy writer does not take option(s) {', '.join(sorted(opts))}")
    _local_only(path)
    out = Path(path)
    layers: dict[str, list[Tensor]] = {}
    optimizer: list[Tensor] = []
    for t in td.values():
        if t.attrs.get("role") in ("optimizer", "step"):
            optimizer.append(t)
        else:
            layers.setdefault(t.attrs.get("keras.layer") or t.name.split("/", 1)[0], []).append(t)
    with _new_file(out) as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        f.attrs["backend"] = b"tensorflow"
        # a Keras 2 version: without one, tf_keras's loader takes the file for Keras 1's and converts kernels
        f.attrs["keras_version"] = b"2.21.0"
        for layer, tensors in layers.items():
            g = _group(f, layer, hdf5.h5py_module())
            g.attrs["weight_names"] = [t.name.encode() for t in tensors]
            _write_datasets(g, [(t, t.name) for t in tensors], out, name_attr=False)
        if optimizer:
            g = _group(f, "optimizer_weights", hdf5.h5py_module())
            g.attrs["weight_names"] = [t.name.encode() for t in optimizer]
            _write_datasets(g, [(t, t.name) for t in optimizer], out, name_attr=False)
    return {}


WRITERS = (
    Writer("weights", write_weights, holds, suffix=".weights.h5", prepare=prepare, takes_template=accepts_template,
           description="a Keras 3 .weights.h5 (model.load_weights); with --template m.keras in its layout"),
    Writer("keras", write_keras, holds, suffix=".keras", prepare=prepare, takes_template=accepts_template,
           needs_template=True, description="a .keras file: --template's config and metadata with these weights"),
    Writer("legacy", write_legacy, holds, suffix=".h5",
           description="legacy Keras 2 / tf_keras HDF5 weights (save_weights('w.h5'))"),
)
