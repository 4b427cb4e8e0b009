"""Helpers shared by the TensorFlow checkpoint tests (oracle: TensorFlow 2.21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_same(ours, theirs, what: str = "") -> None:
    """Bit-for-bit equality (NaN-safe): same shape, dtype width and bytes; strings element-wise."""
    a, b = np.asarray(ours), np.asarray(theirs)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.dtype == object or b.dtype == object or b.dtype.kind in "SU":
        assert [bytes(x) for x in a.reshape(-1)] == [bytes(x) for x in b.reshape(-1)], what
        return
    assert a.dtype.name == b.dtype.name, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{what}: values differ"


def tf_value(tf, prefix: str, name: str, np_dtype):
    """TensorFlow's value of ``name``: ``get_tensor`` when it can, else ``tf.raw_ops.RestoreV2``
    (which reads V1 float16/complex/uint16 and partitioned tensors that ``get_tensor`` refuses).

    Strings always come from RestoreV2: ``get_tensor`` returns them as NumPy ``S`` values,
    which drop trailing NUL bytes (a serialized object graph can end with one).
    """
    if np.dtype(np_dtype) == object:
        return restore_v2(tf, prefix, name, np_dtype)
    try:
        return np.asarray(tf.train.load_checkpoint(prefix).get_tensor(name))
    except Exception:
        return restore_v2(tf, prefix, name, np_dtype)


def restore_v2(tf, prefix: str, name: str, np_dtype):
    dt = tf.string if np.dtype(np_dtype) == object else tf.as_dtype(np_dtype)
    with tf.device("/cpu:0"):
        out = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[""], dtypes=[dt])
    value = out[0].numpy()
    if isinstance(value, bytes):  # keep it an object array: np.asarray(bytes) would drop trailing NULs
        arr = np.empty((), dtype=object)
        arr[()] = value
        return arr
    return value


def sample_arrays(ml_dtypes) -> dict[str, np.ndarray]:
    """One array per dtype TF checkpoints hold, with edge values; plus scalars and empties."""
    rng = np.random.default_rng(0)
    f = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-3, 65504.0, 3.0e38], dtype=np.float64)
    out = {
        "f64": np.concatenate([f, rng.standard_normal(14)]).reshape(4, 6),
        "f32": np.concatenate([f, rng.standard_normal(14)]).astype(np.float32).reshape(2, 3, 4),
        "f16": np.array([0, -0.0, 1.5, np.inf, np.nan, 65504, 6e-8, -3], dtype=np.float16),
        "bf16": np.array([0, -0.0, 1.5, np.inf, np.nan, 3e38, -1e-20], dtype=ml_dtypes.bfloat16),
        "f8e4m3": np.array([0, 1, -2, 448, 0.015625, np.nan], dtype=ml_dtypes.float8_e4m3fn),
        "f8e5m2": np.array([0, 1, -2, 57344, np.inf, np.nan], dtype=ml_dtypes.float8_e5m2),
        "i8": np.array([-128, -1, 0, 1, 127], dtype=np.int8),
        "i16": np.array([-32768, -1, 0, 300, 32767], dtype=np.int16),
        "i32": np.array([[-2**31, -1], [0, 2**31 - 1]], dtype=np.int32),
        "i64": np.array([-2**63, -1, 0, 2**62, 2**63 - 1], dtype=np.int64),
        "u8": np.array([0, 1, 128, 255], dtype=np.uint8),
        "u16": np.array([0, 1, 40000, 65535], dtype=np.uint16),
        "u32": np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32),
        "u64": np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64),
        "bool": np.array([[True, False, True], [False, False, True]]),
        "c64": np.array([1 + 2j, -3.5 - 0j, complex(np.nan, np.inf)], dtype=np.complex64),
        "c128": np.array([[1 + 2j, -3.5e300 - 1e-300j]], dtype=np.complex128),
        "str": np.array([[b"", b"a"], [b"\x00\xff binary", b"x" * 300]], dtype=object),
        "scope/scalar_f32": np.array(3.25, dtype=np.float32),
        "scope/scalar_i64": np.array(-7, dtype=np.int64),
        "scalar_str": np.array(b"hello", dtype=object),
        "empty_f32": np.zeros((0, 3), dtype=np.float32),
        "empty_str": np.zeros((0,), dtype=object),
        "name.with.dots/and-dash_0": rng.standard_normal((3, 5)).astype(np.float32),
    }
    return out


V1_KEYS = ("f64", "f32", "f16", "i8", "i16", "i32", "i64", "u8", "u16", "bool", "c64", "c128", "str",
           "scope/scalar_f32", "scope/scalar_i64", "scalar_str", "empty_f32", "empty_str",
           "name.with.dots/and-dash_0")


BLOCKED = ("tensorflow", "tf_keras", "keras", "tf2onnx")

_SITECUSTOMIZE = '''\
"""Installed by the tests: this interpreter cannot import TensorFlow; attempts are logged."""
import os, sys

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            with open(os.environ["CONVERT_TEST_BLOCKED_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{{name}} cannot be imported here (blocked by the test)")

sys.meta_path.insert(0, _NoTensorFlow())
'''


def run_without_tensorflow(args: list[str], workdir, cwd=None):
    """``python -m convert ARGS`` in a process whose environment cannot import TensorFlow (nor
    Keras, tf2onnx): a ``sitecustomize`` on ``PYTHONPATH`` refuses them and logs every attempt.
    Returns the CompletedProcess; asserts that nothing tried to import them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    site = Path(workdir) / "no-tensorflow-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=BLOCKED))
    log = site / "blocked.log"
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CONVERT_TEST_BLOCKED_LOG": str(log)}
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr, "the block does not work"
    log.write_text("")
    res = subprocess.run([sys.executable, "-m", "convert", *map(str, args)], env=env, capture_output=True,
                         text=True, cwd=cwd)
    assert log.read_text() == "", f"the conversion tried to import: {log.read_text().split()}"
    return res


def strip_full_names(tf, saved_model_dir: Path) -> None:
    """Rewrite ``variables/`` with every ``full_name`` of its object graph cleared, as in the
    issue's SavedModels, whose bundles named variables only by object path; the rest (keys,
    values, ``saved_model.pb``) stays, and TensorFlow loads the SavedModel as before."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    prefix = str(saved_model_dir / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    for node in graph.nodes:
        for attribute in node.attributes:
            attribute.full_name = ""
    values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
    values["_CHECKPOINTABLE_OBJECT_GRAPH"] = graph.SerializeToString()
    for f in (saved_model_dir / "variables").iterdir():
        f.unlink()
    names = sorted(values)
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=[tf.constant(values[k]) for k in names])
