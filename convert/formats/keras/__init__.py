"""Keras weight files, read and written through h5py with no TensorFlow and no Keras installed.

Four layouts (Keras's own code: keras/src/saving/saving_lib.py for Keras 3,
keras/src/legacy/saving/legacy_h5_format.py and tf_keras/src/saving/legacy/hdf5_format.py for
the legacy one):

* ``model.save("m.keras")`` (Keras 3): a zip of ``metadata.json``, ``config.json`` and
  ``model.weights.h5`` (stored, not deflated); also the same members unzipped in a folder;
* ``model.save_weights("m.weights.h5")`` (Keras 3): groups ``layers/<class>[_N]/vars/0..N-1``
  named after the layers' classes in ``model.layers`` order, each ``vars`` group with the
  layer's name as its ``name`` attribute, ``optimizer/vars/0..N-1``; the variables' own names are
  not stored, only their order, so readable names come from ``config.json`` (:mod:`.names`);
* legacy Keras 2 / tf_keras HDF5 (``model.save("m.h5")``, ``save_weights("w.h5")``):
  ``layer_names`` on the root (or ``model_weights``) and ``weight_names`` (``conv2d/kernel:0``)
  on each layer's group, optimizer state under ``optimizer_weights``;
* sharded Keras 3 weights (``save_weights(..., max_shard_size=...)``): ``model.weights.json``
  (``weight_map``: ``/layers/conv2d/vars`` -> shard file names) and ``model_0000N.weights.h5``.

Names: ``conv2d/kernel``, ``dense_1/bias``, ``lstm/lstm_cell/kernel`` (Keras's
``variable.path``; for a legacy file its ``weight_names`` without ``:0``); a bare Keras 3
``.weights.h5`` without its config keeps the HDF5 paths, with a note; ``--names keys`` keeps
the HDF5 paths always. Optimizer variables have ``role`` ``optimizer`` (the iteration counter
``step``), so ``--weights-only`` leaves them out.

Writing (:mod:`.writing`): a Keras 3 ``.weights.h5`` (default), a ``.keras`` zip built on
``--template m.keras`` (its config and metadata, our weights resolved by name and shape), and
a legacy ``.h5`` weights file (``keras:legacy``).

HDF5 access goes through :mod:`.hdf5` (links, virtual and external datasets refused; claimed
sizes checked against stored ones).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ...errors import MissingDependencyError
from ..base import Format, Option
from . import hdf5, reading, writing

NAME = reading.NAME

NAMES_OPTION = Option("--names", "read", str, "keras: readable Keras names (conv2d/kernel, the default) or the "
                      "HDF5 paths (keys)", choices=("readable", "keys"))


def _is_zip_keras(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except reading.ZIP_ERRORS:
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
        h5py = hdf5.h5py_module()
    except MissingDependencyError:
        return True
    try:
        with h5py.File(path, "r", locking=False) as f:
            return reading.kind_of(f) is not None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError):
        return False


def _is_weights_map(path: Path) -> bool:
    """A Keras sharded weights map: JSON with a ``weight_map`` whose keys are ``/.../vars`` paths."""
    if not (path.is_file() and path.name.endswith(".json")):
        return False
    try:
        if path.stat().st_size > reading.MAX_JSON:
            return False
        doc = reading.load_json(path.read_bytes(), str(path), path.name)
    except (OSError, reading.CorruptFileError):
        return False
    wm = doc.get("weight_map")
    return isinstance(wm, dict) and bool(wm) and all(isinstance(k, str) and k.endswith("/vars") for k in wm)


def detect(path: Path) -> bool:
    try:
        if path.is_dir():
            return (_is_hdf5(path / reading.WEIGHTS_MEMBER) and (path / reading.CONFIG_MEMBER).is_file()) \
                or _is_weights_map(path / "model.weights.json")
        if not path.is_file():
            return False
        return _is_zip_keras(path) or _is_keras_hdf5(path) or _is_weights_map(path)
    except OSError:
        return False


def read(path: os.PathLike | str, names: str | None = None):
    """Read a Keras file, folder or sharded map lazily (see the module docstring).

    Args:
        path: a ``.keras`` zip or folder, a ``.weights.h5``, a legacy ``.h5``, or a sharded
            ``model.weights.json`` (or the folder holding it).
        names: "readable" (default) or "keys" (the HDF5 paths).

    Returns:
        The TensorDict, with ``attrs["role"]`` and ``attrs["keras.path"]`` (the dataset's path)
        on each tensor; metadata ``source.format``, ``keras.layout`` and, when known,
        ``keras.version``.
    """
    return reading.read(Path(path), names)


FORMAT = Format(
    name=NAME,
    description="Keras weights: .keras (zip or folder), Keras 3 .weights.h5 (sharded too), legacy Keras 2 .h5",
    detect=detect,
    read=read,
    writers=writing.WRITERS,
    options=(NAMES_OPTION, *writing.OPTIONS),
    suffixes=(".keras", ".h5", ".hdf5"),
    checksums="",
)
