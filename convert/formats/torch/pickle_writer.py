"""The pickle writer for ``.pt`` files: the protocol-2 ``data.pkl`` ``torch.save`` writes for a flat
``OrderedDict`` of tensors, emitted opcode by opcode (no torch needed)."""

from __future__ import annotations

import builtins
import functools
import io
import pickle
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ... import dtypes
from .torch_pickle import STORAGE_DTYPES, contiguous_strides


@dataclass(frozen=True)
class StorageOut:
    key: str
    dtype: dtypes.DType
    numel: int  # elements for typed storages, bytes for untyped ones (torch's convention)


class _Emitter:
    """Just the protocol-2 opcodes torch.save uses, with a memo for repeated globals."""

    def __init__(self):
        self.out = io.BytesIO()
        self.memo: dict[object, int] = {}
        self.out.write(pickle.PROTO + b"\x02")

    def _put(self, key):
        idx = len(self.memo)
        self.memo[key] = idx
        self.out.write(pickle.BINPUT + bytes([idx]) if idx < 256 else pickle.LONG_BINPUT + struct.pack("<I", idx))

    def _get(self, key) -> bool:
        idx = self.memo.get(key)
        if idx is None:
            return False
        self.out.write(pickle.BINGET + bytes([idx]) if idx < 256 else pickle.LONG_BINGET + struct.pack("<I", idx))
        return True

    def glob(self, module: str, name: str):
        if not self._get(("g", module, name)):
            self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
            self._put(("g", module, name))

    def string(self, s: str, memo: bool = False):
        if memo and self._get(("s", s)):
            return
        data = s.encode("utf-8")
        self.out.write(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)
        if memo:
            self._put(("s", s))

    def int(self, v: int):
        if 0 <= v < 256:
            self.out.write(pickle.BININT1 + bytes([v]))
        elif 0 <= v < 65536:
            self.out.write(pickle.BININT2 + struct.pack("<H", v))
        elif -(2 ** 31) <= v < 2 ** 31:
            self.out.write(pickle.BININT + struct.pack("<i", v))
        else:
            data = pickle.encode_long(v)
            self.out.write(pickle.LONG1 + bytes([len(data)]) + data)

    def int_tuple(self, values: Iterable[builtins.int]):
        values = tuple(values)
        if not values:
            self.out.write(pickle.EMPTY_TUPLE)
            return
        if len(values) > 3:
            self.out.write(pickle.MARK)
        for v in values:
            self.int(v)
        self.out.write({1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(values), pickle.TUPLE))

    def op(self, code: bytes):
        self.out.write(code)

    def since(self, start: builtins.int) -> bytes:
        """The bytes written from offset ``start`` on."""
        with self.out.getbuffer() as view:
            return bytes(view[start:])


def state_dict_pickle(entries: Iterable[tuple[str, StorageOut, tuple[int, ...]]]) -> bytes:
    """The ``data.pkl`` torch.save writes for an ``OrderedDict`` name -> contiguous tensor.

    ``entries``: (name, storage, shape); several names may share one storage (tied weights).
    Typed storages use ``_rebuild_tensor_v2`` with ``torch.<X>Storage``; dtypes without a
    legacy storage class (float8, uint16/32/64) use ``_rebuild_tensor_v3`` with
    ``torch.storage.UntypedStorage`` and the dtype, as torch 2.x does.
    """
    legacy = {v: k for k, v in STORAGE_DTYPES.items()}
    e = _Emitter()
    e.glob("collections", "OrderedDict")
    e.op(pickle.EMPTY_TUPLE + pickle.REDUCE)
    write = e.out.write
    # The runs of opcodes that are the same for every tensor of a storage class once their globals
    # and strings are in the memo (then they are all BINGETs): emitted opcode by opcode until then,
    # then written as the bytes they came to; likewise each shape's (shape, strides). 50,000 tensors:
    # 0.30 s instead of 0.88 s.
    runs: dict[tuple, bytes] = {}

    def run(key: tuple, emit) -> None:
        done = runs.get(key)
        if done is not None:
            write(done)
            return
        start, memo = e.out.tell(), len(e.memo)
        emit()
        if len(e.memo) == memo:  # nothing new put: the same bytes every time from now on
            runs[key] = e.since(start)

    def head(storage_class: str | None) -> None:
        e.glob("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        e.op(pickle.MARK)
        # persistent id ('storage', storage_type, key, location, numel)
        e.op(pickle.MARK)
        e.string("storage", memo=True)
        if storage_class:
            e.glob("torch", storage_class)
        else:
            e.glob("torch.storage", "UntypedStorage")

    def tail(storage_class: str | None, dtype: dtypes.DType) -> None:
        e.op(pickle.NEWFALSE)
        e.glob("collections", "OrderedDict")
        e.op(pickle.EMPTY_TUPLE + pickle.REDUCE)
        if not storage_class:
            assert dtype.torch is not None  # the core refused, before writing, what torch cannot hold
            e.glob("torch", dtype.torch)
        e.op(pickle.TUPLE + pickle.REDUCE)

    def cpu() -> None:
        e.string("cpu", memo=True)

    shapes: dict[tuple[int, ...], bytes] = {}
    batch = 0
    for name, storage, shape in entries:
        if batch == 0:
            e.op(pickle.MARK)
        e.string(name)
        storage_class = legacy.get(storage.dtype.name)
        run(("head", storage_class), functools.partial(head, storage_class))
        e.string(storage.key)
        run(("cpu",), cpu)
        e.int(storage.numel)
        e.op(pickle.TUPLE + pickle.BINPERSID)
        e.int(0)
        layout = shapes.get(shape)
        if layout is None:
            start = e.out.tell()
            e.int_tuple(shape)
            e.int_tuple(contiguous_strides(shape))
            layout = shapes[shape] = e.since(start)  # ints and tuples: never in the memo
        else:
            write(layout)
        run(("tail", storage_class, storage.dtype.name), functools.partial(tail, storage_class, storage.dtype))
        batch += 1
        if batch == 1000:  # pickle's own batch size for SETITEMS
            e.op(pickle.SETITEMS)
            batch = 0
    if batch:
        e.op(pickle.SETITEMS)
    e.op(pickle.STOP)
    return e.out.getvalue()
