"""PyTorch checkpoints: ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

Spec: there is no written spec; the reference is torch/serialization.py
(https://github.com/pytorch/pytorch/blob/main/torch/serialization.py) and
caffe2/serialize/inline_container.h. The layouts, told apart by content:

* zip (torch >= 1.6): ``<stem>/data.pkl`` (protocol-2 pickle of the object, storages as
  persistent ids ``('storage', torch.FloatStorage, key, location, numel)``),
  ``<stem>/data/<key>`` (raw little-endian storage bytes, stored uncompressed with the
  data aligned to 64 bytes), ``<stem>/byteorder``, ``<stem>/version``,
  ``<stem>/.data/serialization_id``. Files from torch 1.6-1.12 lack ``byteorder`` and
  often use ``archive/`` as the top folder.
* legacy (torch < 1.6, or ``_use_new_zipfile_serialization=False``): a bare stream of
  pickles: the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a sys-info
  dict, the object, the list of storage keys; then each storage as an int64 element
  count followed by its bytes.
* TorchScript (``torch.jit.save``): a zip file as above whose ``data.pkl`` holds the module
  object tree, with ``code/`` and ``constants.pkl`` beside it; its parameters and buffers are read
  by module path (see :mod:`convert.formats.torch.script`), never its code.
* (the pre-0.4 tar layout is not supported.)

Reading never runs code from the file and never imports torch or anything the file names: the
pickle goes through :mod:`convert.formats.torch.torch_pickle`'s restricted unpickler, which
gives tensors for what a state_dict needs and inert placeholders for every other global (kept as
text in ``torch.stubbed.<path>``, the globals listed in ``torch.stubbed_globals`` and in a note);
a whole pickled model (``torch.save(model)``) reads as its ``state_dict()`` (``torch.pickled_modules``
says where); a file whose tensors are all inside other objects reads them by attribute path
(``torch.opened_placeholders``); only a file with no tensors at all is refused. We use it even when
torch is installed, because it gives what ``torch.load`` cannot: lazy per-tensor reads
(each tensor a :class:`~convert.ir.FileRegion` into the zip member, found from the local
file header, so a conversion reads one storage at a time and a rename-only conversion
copies bytes without NumPy), no 1.6 s torch import, and the same result with and without
torch. The tests check that it equals ``torch.load(weights_only=True)`` on every corpus
file and every generated file (``torch.load(weights_only=False)`` for files that one refuses,
``torch.jit.load(f).state_dict()`` for TorchScript).

Views are resolved here: a tensor is (storage, offset, shape, stride); a contiguous one is
a FileRegion, any other (transposed, sliced, conj/neg bit, big-endian) an ArraySource
built with ``as_strided`` over the bytes it spans. Names sharing one storage (tied
weights) get ``attrs["torch.shared_with"]`` (a JSON list of the other names).

Training checkpoints: the weights are looked up under ``state_dict``,
``model_state_dict``, ``model_state``, ``model``, ``net``, ``network``, ``module``
(metadata ``torch.key`` says which; ``--key a.b`` picks another); a ``module.`` prefix on
every name (DataParallel) is removed (``torch.stripped_prefix``). Non-tensor entries that
JSON can hold go to ``torch.extra.<path>``; placeholders to ``torch.stubbed.<path>``; everything
else not read (optimizer tensors, NumPy arrays, unsupported objects) is listed in
``torch.skipped``. NumPy arrays pickled in a checkpoint are tensors like the others (attribute
``torch.numpy``), read with ``--key`` where they are.

Writing produces what ``torch.save(OrderedDict)`` produces (zip layout, no torch needed):
deterministic bytes (fixed timestamps, a serialization id derived from the content),
storages streamed one at a time with 64-byte alignment, tied tensors (the same source
object) sharing one storage. The TensorDict's metadata rides along in an extra record
``<stem>/convert/metadata.json`` that torch ignores.

Remote paths (``Format.remote``, :mod:`convert.storage`): a zip checkpoint in object storage is
read by ranged GETs: the central directory and ``data.pkl`` through a read-ahead file, the
30-byte local headers of every storage record in one batch of concurrent GETs, each storage as a
:class:`~convert.storage.RemoteRegion` (its CRC-32 checked on the way). A legacy file costs a
small GET per storage to walk its blocks. A remote output is one upload written in one pass:
as the upload cannot seek back to patch a member's CRC-32, each member carries it after its bytes
in a data descriptor (torch.load and zipfile read it from the central directory).
"""

from __future__ import annotations

from ... import dtypes
from ..base import Format, Option, Writer
from .containers import MAGIC_NUMBER, PROTOCOL_VERSION, detect
from .reader import NAME, read
from .writer import write

FORMAT = Format(
    name=NAME,
    description="PyTorch state_dict, training checkpoint or TorchScript archive (.pt/.pth/.bin/.ckpt)",
    detect=detect,
    read=read,
    writers=(Writer("", write, dtypes.held_by("torch"), suffix=".pt", keeps_shared_storage=True),),
    options=(
        Option("--key", "read", str,
               "dotted path of the state_dict inside a training checkpoint (e.g. model.state_dict); "
               "'' for the top level. Default: found automatically"),
        Option("--keep-prefix", "read", bool, "keep the 'module.' prefix DataParallel puts on every name"),
    ),
    suffixes=(".pt", ".pth"),
    name_endings=(r"\.bin", r"\.ckpt"),
    checksums="zip layouts: CRC-32 of every storage record (legacy pickle files have none)",
    remote=True,
)

__all__ = ["NAME", "FORMAT", "MAGIC_NUMBER", "PROTOCOL_VERSION", "detect", "read", "write"]
