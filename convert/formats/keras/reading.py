"""Reading the four Keras layouts (see the package docstring)."""

from __future__ import annotations

import json
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ... import storage
from ...errors import CorruptFileError, ReadError, UsageError
from ...ir import Tensor, TensorDict
from . import hdf5, names

NAME = "keras"
WEIGHTS_MEMBER = "model.weights.h5"
CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
MAX_JSON = 64 << 20
_STEP_NAMES = {"iteration", "iterations", "iter"}
_LEGACY_LAYERS = "_layer_checkpoint_dependencies"
ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError, EOFError, zlib.error)
"""What zipfile raises on a damaged archive (an unknown 'version needed', a bad CRC, bad deflate data)."""
NOTE = "local.note.keras.names"  # convert.api.READ_NOTE: shown to the user, never written  # tf.keras 2.13's .keras files say this for "layers"


@dataclass
class Found:
    """What was read of one HDF5 file (or all shards of one set)."""

    tensors: list[Tensor] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- what an HDF5 file holds

def kind_of(f) -> str | None:
    """``legacy-model`` (``model.save("m.h5")``), ``legacy-weights`` (``save_weights("w.h5")``),
    ``weights`` (Keras 3 ``.weights.h5``), or None for an HDF5 file that is not Keras's."""
    h5py = hdf5.h5py_module()
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return "legacy-weights"
    mw = f.get("model_weights", getlink=True)
    if isinstance(mw, h5py.HardLink) and isinstance(f["model_weights"], h5py.Group) and (
            "layer_names" in f["model_weights"].attrs or "layer_names0" in f["model_weights"].attrs):
        return "legacy-model"
    for key in ("layers", "vars", "optimizer", _LEGACY_LAYERS):
        link = f.get(key, getlink=True)
        if isinstance(link, h5py.HardLink) and isinstance(f[key], h5py.Group):
            return "weights"
    return None


def _not_keras(where: hdf5.Where, f) -> ReadError:
    top = sorted(f.keys())[:8]
    what = f"top-level objects: {', '.join(top)}" if top else "it is empty"
    return ReadError(where.shown, "an HDF5 file, but not Keras weights: no 'layer_names' attribute (legacy "
                                  f"Keras) and no 'layers'/'vars' groups (Keras 3); {what}")


def read_hdf5(where: hdf5.Where, file_size: int, keys: bool, config: dict | None) -> Found:
    with where.open() as f:
        kind = kind_of(f)
        if kind is None:
            raise _not_keras(where, f)
        if kind == "weights":
            found = Found()
            _collect_keras3(f, where, file_size, found.tensors)
            found.metadata["keras.layout"] = "weights.h5"
            return _named_keras3(found, keys, config, where)
        return _read_legacy(f, where, file_size, kind, keys)


# --------------------------------------------------------------------------- Keras 3

def _collect_keras3(f, where: hdf5.Where, file_size: int, out: list[Tensor]) -> None:
    h5py = hdf5.h5py_module()
    for path, obj in hdf5.walk(f, where):
        if not isinstance(obj, h5py.Dataset):
            continue
        attrs = {"keras.path": path, "role": _role(path)}
        group = path.rsplit("/", 1)[0] if "/" in path else ""
        if group.endswith("vars") and "name" in obj.parent.attrs:
            attrs["keras.layer"] = hdf5.attr_text(obj.parent, "name") or ""
        if "name" in obj.attrs:  # written by convert: the variable's readable name
            attrs["keras.name"] = hdf5.attr_text(obj, "name") or ""
        out.append(hdf5.dataset_tensor(path, obj, where, attrs, file_size))


def _role(path: str) -> str:
    if path.startswith("optimizer/"):
        return "optimizer"
    if path.startswith("metrics/"):  # tf_keras's .keras files keep the compiled metrics' state (total, count)
        return "other"
    return "weight"


def _index(path: str) -> tuple:
    head, _, last = path.rpartition("/")
    return (head, int(last)) if last.isdigit() else (head, -1, last)


def _named_keras3(found: Found, keys: bool, config: dict | None, where: hdf5.Where) -> Found:
    tensors = sorted(found.tensors, key=lambda t: _index(t.attrs["keras.path"]))
    meta = found.metadata
    readable: dict[str, str] = {}
    order: dict[str, int] = {}
    if keys:
        meta["keras.names"] = "keys"
    elif config is not None:
        readable, optimizer, naming = _config_names(tensors, config)
        readable.update(optimizer)
        order = {p: i for i, p in enumerate(readable)}  # the model's order (model.weights), then the optimizer's
        meta["keras.names"] = "config"
        unnamed = [t.name for t in tensors if t.name not in readable]
        notes = []
        if naming.by_base:
            notes.append(f"layers of classes convert does not know, named as the built-in class their name ends "
                         f"with: {', '.join(naming.by_base[:5])}{', ...' if len(naming.by_base) > 5 else ''}")
        if naming.unknown:
            notes.append(f"variables of layers convert cannot name are numbered: {', '.join(naming.unknown[:5])}"
                         f"{', ...' if len(naming.unknown) > 5 else ''}")
        if notes:
            meta[NOTE + "_config"] = "; ".join(notes)
        if unnamed:
            meta[NOTE] = (f"{len(unnamed)} variables keep their HDF5 paths: their layers' variables are not "
                                  f"known to convert or do not fit the config ({', '.join(unnamed[:5])}"
                                  f"{', ...' if len(unnamed) > 5 else ''})")
    elif tensors and all(t.attrs.get("keras.name") for t in tensors) and \
            len({t.attrs["keras.name"] for t in tensors}) == len(tensors):
        readable = {t.name: t.attrs["keras.name"] for t in tensors}
        meta["keras.names"] = "stored"
    else:
        meta["keras.names"] = "keys"
        meta[NOTE] = ("tensors are named by their HDF5 paths: a Keras 3 .weights.h5 stores variables by "
                              "position only, and their names come from the model's config.json, which this "
                              "file does not include (read the .keras file or its unzipped folder instead)")
    out = []
    for t in tensors:
        name = readable.get(t.name, t.name)
        attrs = dict(t.attrs)
        if name in _STEP_NAMES or name.rsplit("/", 1)[-1] in _STEP_NAMES and attrs["role"] == "optimizer":
            attrs["role"] = "step"
        out.append(Tensor(name, t.dtype, t.shape, t.source, attrs))
    if order:
        out.sort(key=lambda t: order.get(t.attrs["keras.path"], len(order)))  # stable: the rest in path order
    found.tensors = out
    if len({t.name for t in out}) != len(out):
        raise CorruptFileError(where.shown, "two variables resolve to the same name; read with --names keys")
    return found


def _config_names(tensors: list[Tensor], config: dict) -> tuple[dict[str, str], dict[str, str], names.Naming]:
    saveables: dict[str, names.Saveable] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        path = _canonical(t.attrs["keras.path"])
        m = re.fullmatch(r"(?:(.*)/)?vars/(\d+)", path)
        if not m:
            continue
        owner = m.group(1) or ""
        s = saveables.setdefault(owner, names.Saveable(owner, t.attrs.get("keras.layer"), 0))
        s.count += 1
    # groups with a 'name' attribute but no variables (a LSTM above its cell) count for naming too
    for t in tensors:
        layer = t.attrs.get("keras.layer")
        if layer:
            saveables[_canonical(t.attrs["keras.path"]).rsplit("/vars/", 1)[0]].name = layer
    naming = names.name_model(config, saveables)
    by_path = {t.attrs["keras.path"]: t for t in tensors}
    readable = {}
    by_canonical = {_canonical(t.attrs["keras.path"]): t for t in tensors}
    for path, name in naming.names.items():  # in config order
        hit = by_canonical.get(path)
        if hit is not None:
            readable[hit.name] = name
            shapes[name] = hit.shape
    opt = sorted((p for p in by_path if p.startswith("optimizer/vars/")), key=_index)
    optimizer: dict[str, str] = {}
    if opt:
        got = names.name_optimizer(config.get("compile_config"), [by_path[p].shape for p in opt],
                                   [by_path[p].shape == () for p in opt], naming.trainable, shapes)
        if got is not None and not set(got) & set(readable.values()):
            optimizer = dict(zip(opt, got, strict=True))
    return readable, optimizer, naming


def _canonical(path: str) -> str:
    return "layers" + path[len(_LEGACY_LAYERS):] if path.startswith(_LEGACY_LAYERS) else path


# --------------------------------------------------------------------------- legacy (Keras 2 / tf_keras)

def _get(group, path: str, where: hdf5.Where):
    """``group[path]``, refusing any soft or external link on the way."""
    h5py = hdf5.h5py_module()
    obj = group
    for part in path.split("/"):
        if not part:
            continue
        if not isinstance(obj, h5py.Group) or part not in obj:
            raise where.error(f"'{path}' named in the file's attributes is not in the file")
        link = obj.get(part, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise where.error(f"'{path}' passes through a {type(link).__name__}; refused")
        obj = obj[part]
    return obj


def _read_legacy(f, where: hdf5.Where, file_size: int, kind: str, keys: bool) -> Found:
    h5py = hdf5.h5py_module()
    root = f["model_weights"] if kind == "legacy-model" else f
    found = Found()
    meta = found.metadata
    meta["keras.layout"] = "legacy-h5-model" if kind == "legacy-model" else "legacy-h5-weights"
    for key, attr in (("keras.version", "keras_version"), ("keras.backend", "backend")):
        value = hdf5.attr_text(root, attr) or hdf5.attr_text(f, attr)
        if value:
            meta[key] = value
    meta["keras.names"] = "keys" if keys else "weight_names"
    try:
        layer_names = hdf5.attr_list(root, "layer_names") or []
    except TypeError as e:
        raise where.error(str(e)) from None
    entries: list[tuple[str, str, object, str]] = []  # (layer, weight name, dataset, role)
    groups = [(ln, "weight") for ln in layer_names]
    if "top_level_model_weights" in root and "top_level_model_weights" not in layer_names:
        groups.append(("top_level_model_weights", "weight"))
    for layer, role in groups:
        g = _get(root, layer, where)
        if not isinstance(g, h5py.Group):
            raise where.error(f"layer '{layer}' is not a group")
        try:
            weight_names = hdf5.attr_list(g, "weight_names") or []
        except TypeError as e:
            raise where.error(f"layer '{layer}': {e}") from None
        entries += [(layer, wn, _get(g, wn, where), role) for wn in weight_names]
    if "optimizer_weights" in f:
        og = _get(f, "optimizer_weights", where)
        try:
            for wn in hdf5.attr_list(og, "weight_names") or []:
                entries.append(("optimizer_weights", wn, _get(og, wn, where), "optimizer"))
        except TypeError as e:
            raise where.error(f"optimizer_weights: {e}") from None
    taken: set[str] = set()
    for layer, wn, ds, role in entries:
        if not isinstance(ds, h5py.Dataset):
            raise where.error(f"weight '{wn}' of layer '{layer}' is not a dataset")
        path = ds.name.lstrip("/")
        readable = wn[:-2] if wn.endswith(":0") else wn
        if role == "optimizer" and readable.rsplit("/", 1)[-1] in _STEP_NAMES:
            role = "step"
        name = path if keys else readable
        if name in taken:
            name = f"{layer}/{readable}" if f"{layer}/{readable}" not in taken else path
        if name in taken:
            raise where.error(f"weight '{wn}' of layer '{layer}' is listed twice")
        taken.add(name)
        attrs = {"role": role, "keras.path": path, "keras.layer": layer, "keras.weight_name": wn}
        found.tensors.append(hdf5.dataset_tensor(name, ds, where, attrs, file_size))
    return found


# --------------------------------------------------------------------------- containers

def load_json(raw: bytes, shown: str, what: str) -> dict:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(shown, f"{what} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(shown, f"{what} is not a JSON object")
    return doc


def _read_json_file(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_JSON:
            raise CorruptFileError(path, f"larger than {MAX_JSON >> 20} MiB")
        raw = path.read_bytes()
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror}") from None
    return load_json(raw, str(path), path.name)


def is_keras_config(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("class_name"), str) and isinstance(doc.get("config"), dict)


def check_members(zf: zipfile.ZipFile, path: Path) -> None:
    """Refuse an archive with a member that would land outside a folder it is extracted to."""
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", name) or "\0" in name:
            raise CorruptFileError(path, f"archive member '{name}' has a path outside the archive (path traversal); "
                                         "refused")


def member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header (whose name and extra
    field lengths may differ from the central directory's)."""
    head = storage.read_at(path, info.header_offset, info.header_offset + 30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise CorruptFileError(path, f"archive member '{info.filename}' has no local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_archive(path: Path, keys: bool) -> TensorDict:
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(hdf5._open_raw(path) if isinstance(path, storage.RemotePath) else path)
    except ZIP_ERRORS as e:
        raise CorruptFileError(path, f"not a readable zip archive ({e})") from None
    with zf:
        check_members(zf, path)
        members = {i.filename: i for i in zf.infolist()}
        if "model.weights.npz" in members and WEIGHTS_MEMBER not in members:
            raise ReadError(path, "holds its weights as model.weights.npz (weights_format='npz'), a pickled form "
                                  "convert does not unpickle; save it with the default weights_format='h5'")
        if WEIGHTS_MEMBER not in members:
            raise ReadError(path, f"a zip archive without {WEIGHTS_MEMBER}: not a Keras 3 .keras file")
        config = metadata = None
        try:
            if CONFIG_MEMBER in members:
                if members[CONFIG_MEMBER].file_size > MAX_JSON:
                    raise CorruptFileError(path, f"{CONFIG_MEMBER} is larger than {MAX_JSON >> 20} MiB")
                config = load_json(zf.read(CONFIG_MEMBER), str(path), CONFIG_MEMBER)
            if METADATA_MEMBER in members and members[METADATA_MEMBER].file_size <= MAX_JSON:
                metadata = load_json(zf.read(METADATA_MEMBER), str(path), METADATA_MEMBER)
        except ZIP_ERRORS as e:
            raise CorruptFileError(path, f"damaged archive ({e})") from None
        info = members[WEIGHTS_MEMBER]
        label = f"{path}:{WEIGHTS_MEMBER}"
        if info.flag_bits & 1:
            raise ReadError(path, f"{WEIGHTS_MEMBER} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            start = member_data_offset(path, info)
            if start + info.file_size > size:
                raise CorruptFileError(path, f"{WEIGHTS_MEMBER} lies past the end of the archive (truncated?)")
            where = hdf5.Where(path, start, info.file_size, label=label)
        else:  # a compressed member: refuse what decompresses to far more than it stores (Keras does too)
            if info.file_size > max(hdf5.FLOOR, hdf5.EXPANSION * max(1, info.compress_size)):
                raise CorruptFileError(path, f"{WEIGHTS_MEMBER} claims {info.file_size} bytes from "
                                             f"{info.compress_size} compressed (a zip bomb?); refused")
            where = hdf5.Where(path, member=WEIGHTS_MEMBER, label=label)
    found = read_hdf5(where, info.file_size, keys, config if is_keras_config(config) else None)
    return _result(found, "keras", config, metadata)


def _result(found: Found, layout: str, config: dict | None, metadata: dict | None) -> TensorDict:
    meta = {"source.format": NAME, **found.metadata}
    meta["keras.layout"] = layout if layout != "weights.h5" or "keras.layout" not in meta else meta["keras.layout"]
    if isinstance(metadata, dict) and isinstance(metadata.get("keras_version"), str):
        meta["keras.version"] = metadata["keras_version"]
    if config is not None and is_keras_config(config):
        meta["keras.model_class"] = str(config["class_name"])
    return TensorDict(found.tensors, meta)


def read_folder(path: Path, keys: bool) -> TensorDict:
    config = metadata = None
    if (path / CONFIG_MEMBER).is_file():
        config = _read_json_file(path / CONFIG_MEMBER)
    if (path / METADATA_MEMBER).is_file():
        metadata = _read_json_file(path / METADATA_MEMBER)
    cfg = config if is_keras_config(config) else None
    if (path / "model.weights.json").is_file():
        found = read_sharded(path / "model.weights.json", keys, cfg)
        layout = "folder, sharded"
    elif (path / WEIGHTS_MEMBER).is_file():
        weights = path / WEIGHTS_MEMBER
        found = read_hdf5(hdf5.Where(weights), weights.stat().st_size, keys, cfg)
        layout = "folder"
    else:
        maps = sorted(path.glob("*.weights.json"))
        if len(maps) != 1:
            raise ReadError(path, "not a Keras folder: no model.weights.h5 or model.weights.json (nor a single "
                                  "*.weights.json)")
        found = read_sharded(maps[0], keys, cfg)
        layout = "sharded"
    return _result(found, layout, config, metadata)


def read_sharded(index: Path, keys: bool, config: dict | None) -> Found:
    doc = _read_json_file(index)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptFileError(index, "not a Keras sharded weights map (no 'weight_map' object)")
    shards: list[str] = []
    for key, value in weight_map.items():
        files = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in files):
            raise CorruptFileError(index, f"weight_map entry '{key}' does not name shard files")
        shards += [v for v in files if v not in shards]
    remote = isinstance(index, storage.RemotePath)  # no symbolic links in object storage
    folder = index.parent if remote else index.parent.resolve()
    found = Found()
    seen: dict[str, str] = {}
    for shard in shards:
        shard_path = index.parent / shard
        # shards sit beside the map: a name leading elsewhere ('../', '/abs', a symlink out) is refused
        if "/" in shard or "\\" in shard or "\0" in shard or shard in ("", ".", "..") \
                or not (remote or shard_path.resolve().is_relative_to(folder)):
            raise CorruptFileError(index, f"shard '{shard}' is not a file of the map's folder; refused")
        if not shard_path.is_file():
            raise ReadError(index, f"shard '{shard}' named in the map does not exist")
        where = hdf5.Where(shard_path)
        part: list[Tensor] = []
        with where.open() as f:
            if kind_of(f) != "weights":
                raise CorruptFileError(shard_path, "a shard that holds no Keras 3 weights")
            _collect_keras3(f, where, shard_path.stat().st_size, part)
        for t in part:
            if t.name in seen:
                raise CorruptFileError(index, f"'{t.name}' is in two shards ({seen[t.name]}, {shard})")
            seen[t.name] = shard
        found.tensors += part
    found.metadata["keras.shards"] = str(len(shards))
    return _named_keras3(found, keys, config, hdf5.Where(index))


def read(path: Path, names_mode: str | None) -> TensorDict:
    if names_mode not in (None, "readable", "keys"):
        raise UsageError(f"--names must be 'readable' or 'keys', not '{names_mode}'")
    keys = names_mode == "keys"
    if path.is_dir():
        return read_folder(path, keys)
    if not path.exists():
        raise ReadError(path, "no such file or directory")
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return read_archive(path, keys)
    if path.name.endswith(".json"):
        config = _sibling_config(path)
        return _result(read_sharded(path, keys, config), "sharded", config, None)
    offset = hdf5.signature_at(path)
    if offset is None:
        raise CorruptFileError(path, "not an HDF5 file (no HDF5 signature), a .keras zip or a .weights.json map")
    config = _sibling_config(path)
    found = read_hdf5(hdf5.Where(path), path.stat().st_size, keys, config)
    if config is not None:  # the weights of an unzipped .keras folder, named from its config
        return _result(found, "folder", config, None)
    meta = {"source.format": NAME, **found.metadata}
    return TensorDict(found.tensors, meta)


def _sibling_config(path: Path) -> dict | None:
    """An unzipped .keras folder's config.json beside its model.weights.h5 (or a sharded map's)."""
    if path.name not in (WEIGHTS_MEMBER, "model.weights.json") or not (path.parent / CONFIG_MEMBER).is_file():
        return None
    config = _read_json_file(path.parent / CONFIG_MEMBER)
    return config if is_keras_config(config) else None
