"""Convert a ~1 GB safetensors file: convert (streaming, byte copies) against the safetensors library and cp.

Usage: python benchmarks/bench_safetensors.py [--size-mb 1024] [--repeat 3] [--dir DIR]

* cp:               copying the file (the floor for any conversion that writes every byte)
* ours:             convert.convert(src, dst, to="safetensors"), verified (reads the output back)
* ours --no-verify: the same without verification
* ours sharded:     into a Hugging Face folder of 256 MB shards
* library:          safetensors.numpy.load_file + save_file (the whole checkpoint in memory)
"""

from __future__ import annotations

from pathlib import Path

import harness

RUNNERS = {
    "cp": None,
    "ours": "import convert; convert.convert(SRC, DST, to='safetensors')",
    "ours --no-verify": "import convert; convert.convert(SRC, DST, to='safetensors', verify=False)",
    "ours sharded": "import convert; convert.convert(SRC, DST, to='safetensors', write_opts={'max_shard_size': '256MB'})",
    "library": "from safetensors.numpy import load_file, save_file; save_file(load_file(SRC), DST)",
}


def make_input(path: Path, size_mb: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    per = size_mb * (1 << 20) // 64 // 4
    rng = np.random.default_rng(0)
    save_file({f"layer{i}/weight": rng.standard_normal(per, dtype=np.float32) for i in range(64)}, str(path))


if __name__ == "__main__":
    harness.main(__file__, "safetensors -> safetensors, 64 tensors", make_input, RUNNERS,
                 "in.safetensors", "out.safetensors")
