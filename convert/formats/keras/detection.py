"""Whether a path is Keras's: a ``.keras`` zip or folder, a Keras HDF5 file, a sharded weights map.

Its own module so that the writers (a ``--template``'s check) and the package's ``FORMAT`` share it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ... import storage
from ...errors import ConvertError, MissingDependencyError, ReadError
from . import hdf5, reading


def _is_zip_keras(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                names = set(zf.namelist())
    except (*reading.ZIP_ERRORS, ReadError):  # ReadError: a remote path's
        return False
    return reading.WEIGHTS_MEMBER in names and reading.CONFIG_MEMBER in names


def _is_hdf5(path: Path) -> bool:
    return path.is_file() and hdf5.signature_at(path) is not None


def _is_keras_hdf5(path: Path) -> bool:
    """An HDF5 file holding Keras weights; without h5py, any HDF5 file (no other format uses
    HDF5, and its reader then says which package to install)."""
    if not _is_hdf5(path):
        return False
    try:
        hdf5.h5py_module()
    except MissingDependencyError:
        return True
    try:
        with hdf5.Where(path).open() as f:
            return reading.kind_of(f) is not None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ConvertError):  # Where.open's: CorruptFileError
        return False


def _is_weights_map(path: Path) -> bool:
    """A Keras sharded weights map: JSON with a ``weight_map`` whose keys are ``/.../vars`` paths."""
    if not (path.is_file() and path.name.endswith(".json")):
        return False
    try:
        if path.stat().st_size > reading.MAX_JSON:
            return False
        doc = reading.load_json(path.read_bytes(), str(path), path.name)
    except (OSError, reading.CorruptFileError, ReadError):
        return False
    wm = doc.get("weight_map")
    return isinstance(wm, dict) and bool(wm) and all(isinstance(k, str) and k.endswith("/vars") for k in wm)


def detect(path: Path) -> bool:
    path = storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL
    try:
        if path.is_dir():
            return (_is_hdf5(path / reading.WEIGHTS_MEMBER) and (path / reading.CONFIG_MEMBER).is_file()) \
                or _is_weights_map(path / "model.weights.json")
        if not path.is_file():
            return False
        return _is_zip_keras(path) or _is_keras_hdf5(path) or _is_weights_map(path)
    except (OSError, ReadError):  # ReadError: a remote path's
        return False
