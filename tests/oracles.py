"""Reading files with the frameworks' own code, for comparison with ours."""

from __future__ import annotations

import ml_dtypes
import numpy as np

_TORCH_BITS = {  # torch dtypes NumPy cannot take directly: view as same-size ints, then as ml_dtypes
    "torch.bfloat16": ("int16", ml_dtypes.bfloat16),
    "torch.float8_e4m3fn": ("int8", ml_dtypes.float8_e4m3fn),
    "torch.float8_e5m2": ("int8", ml_dtypes.float8_e5m2),
    "torch.float8_e8m0fnu": ("uint8", ml_dtypes.float8_e8m0fnu),
    "torch.float8_e4m3fnuz": ("uint8", ml_dtypes.float8_e4m3fnuz),
    "torch.float8_e5m2fnuz": ("uint8", ml_dtypes.float8_e5m2fnuz),
}


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as a NumPy array of the matching dtype, bit for bit."""
    import torch

    t = t.detach().cpu().contiguous()
    if str(t.dtype) == "torch.float4_e2m1fn_x2":  # two per byte, the first in the low 4 bits (c10/util/Float4_e2m1fn_x2.h)
        packed = t.view(torch.uint8).numpy()
        pairs = np.stack([packed & 0x0F, packed >> 4], axis=-1)
        return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2).view(ml_dtypes.float4_e2m1fn).copy()
    if str(t.dtype) in _TORCH_BITS:
        int_name, np_dtype = _TORCH_BITS[str(t.dtype)]
        return t.view(getattr(torch, int_name)).numpy().view(np_dtype).copy()
    return t.numpy().copy()


def safetensors_read(path) -> dict[str, np.ndarray]:
    """Read one .safetensors file with the safetensors library (torch backend: it knows bf16/float8)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: torch_to_numpy(f.get_tensor(k)) for k in f.keys()}
