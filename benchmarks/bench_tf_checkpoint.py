"""Convert a ~1 GB V2 checkpoint written by TensorFlow to safetensors: ours against TF and cp.

Usage: python benchmarks/bench_tf_checkpoint.py [--size-mb 1024] [--repeat 3] [--dir DIR]

Contenders, each in a fresh subprocess (import cost and peak RSS included, page cache warm):

* cp:                 copying the checkpoint's data file (the floor for any conversion)
* ours read:          our reader streaming every tensor's bytes, crc32c checked (no output)
* ours:               convert.convert(dir, to="safetensors"), with verification (reads the output back)
* ours --no-verify:   the same without verification
* tf read:            tf.train.load_checkpoint + get_tensor for every tensor (no output)
* tf -> safetensors:  the framework-based script: get_tensor loop, then safetensors.numpy.save_file

The input is 16 float32 variables written by TensorFlow's SaveV2 into a temporary folder.
The table gives median wall seconds and median peak RSS (MB). Not run by the tests.
"""

from __future__ import annotations

from pathlib import Path

import harness

N_TENSORS = 16
PREFIX = "model.ckpt-1"


def make_input(d: Path, size_mb: int) -> None:
    """16 float32 variables totalling ~size_mb, saved by TF's SaveV2, plus a 'checkpoint' file."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    rows = max(1, size_mb * (1 << 20) // 4 // N_TENSORS // 1024)
    rng = np.random.default_rng(0)
    names = [f"layer_{i:02d}/kernel" for i in range(N_TENSORS)]
    d.mkdir(parents=True, exist_ok=True)
    tensors = [tf.constant(rng.standard_normal((rows, 1024), dtype=np.float32)) for _ in names]
    tf.raw_ops.SaveV2(prefix=str(d / PREFIX), tensor_names=names, shape_and_slices=[""] * N_TENSORS,
                      tensors=tensors)
    (d / "checkpoint").write_text(f'model_checkpoint_path: "{PREFIX}"\n')


RUNNERS = {
    "cp": None,
    "ours read": ("from convert.formats import tf_checkpoint\n"
                  "for t in tf_checkpoint.read(SRC).values():\n"
                  "    for _ in t.chunks(): pass"),
    "ours": "import convert; convert.convert(SRC, DST, to='safetensors')",
    "ours --no-verify": "import convert; convert.convert(SRC, DST, to='safetensors', verify=False)",
    "tf read": ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
                "import tensorflow as tf\n"
                "r = tf.train.load_checkpoint(tf.train.latest_checkpoint(SRC))\n"
                "for k in r.get_variable_to_shape_map(): r.get_tensor(k)"),
    "tf -> safetensors": ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
                          "import numpy as np, tensorflow as tf\n"
                          "from safetensors.numpy import save_file\n"
                          "r = tf.train.load_checkpoint(tf.train.latest_checkpoint(SRC))\n"
                          "save_file({k: np.ascontiguousarray(r.get_tensor(k)) "
                          "for k in r.get_variable_to_shape_map()}, DST)"),
}


if __name__ == "__main__":
    harness.main(__file__, f"TF V2 checkpoint -> safetensors, {N_TENSORS} tensors", make_input, RUNNERS, "ckpt",
                 "out.safetensors", data_file=lambda src: src / f"{PREFIX}.data-00000-of-00001")
