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

Remote paths (``Format.remote``, :mod:`convert.storage`): every layout is read from object storage
(h5py through a read-ahead file of small blocks, contiguous datasets as ranged reads); the writers
write local paths only (HDF5 writes its superblock last, which an upload cannot seek back to).
"""

from __future__ import annotations

import os

from ... import storage
from ...ir import TensorDict
from ..base import Format, Option
from . import reading, writing
from .detection import detect

NAME = reading.NAME

NAMES_OPTION = Option("--names", "read", str, "keras: readable Keras names (conv2d/kernel, the default) or the "
                      "HDF5 paths (keys)", choices=("readable", "keys"))


def read(path: os.PathLike | str, names: str | None = None) -> TensorDict:
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
    return reading.read(storage.as_path(path), names)  # type: ignore[arg-type]  # a RemotePath for a URL


FORMAT = Format(
    name=NAME,
    description="Keras weights: .keras (zip or folder), Keras 3 .weights.h5 (sharded too), legacy Keras 2 .h5",
    detect=detect,
    read=read,
    writers=writing.WRITERS,
    options=(NAMES_OPTION, *writing.OPTIONS),
    suffixes=(".keras", ".h5", ".hdf5"),
    checksums="",
    remote=True,
)
