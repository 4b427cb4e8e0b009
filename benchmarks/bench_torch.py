"""Read + write a ~1 GB PyTorch state_dict: convert's torch adapter against torch.load/torch.save.

Usage: python benchmarks/bench_torch.py [--size-mb 1024] [--repeat 3] [--dir DIR]

Each run starts from a file torch.save wrote (64 float32 tensors plus a few small ones)
and produces a new ``.pt``:

* ours:  convert.formats.torch.read + write (lazy reads, storages streamed one by one)
* torch: torch.load(weights_only=True) + torch.save
* torch mmap: torch.load(weights_only=True, mmap=True) + torch.save

Each is run in a fresh subprocess (so import cost and peak RSS are per run); the
table gives the median wall time and the median peak RSS. The page cache is warm
for every contender (the input is read once before timing).
"""

from __future__ import annotations

from pathlib import Path

import harness

RUNNERS = {
    "ours": """
from convert.formats import torch as pt
pt.write(pt.read(SRC), DST)
""",
    "torch": """
import torch
torch.save(torch.load(SRC, weights_only=True), DST)
""",
    "torch mmap": """
import torch
torch.save(torch.load(SRC, weights_only=True, mmap=True), DST)
""",
}


def make_input(path: Path, size_mb: int) -> None:
    import torch

    n_big = 64
    per = size_mb * (1 << 20) // n_big // 4
    sd = {f"layer{i}.weight": torch.randn(per // 1024, 1024) for i in range(n_big)}
    sd.update({f"layer{i}.bias": torch.randn(1024) for i in range(n_big)})
    sd["embed.weight"] = sd["layer0.weight"]  # one tied pair
    torch.save(sd, path)


if __name__ == "__main__":
    harness.main(__file__, "torch state_dict -> .pt, 129 tensors", make_input, RUNNERS, "input.pt", "out.pt")
