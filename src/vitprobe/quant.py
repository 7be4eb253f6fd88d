"""Quantised token stores: fp8 (e4m3) or int8 codes with one fp32 scale per token, and back to floats.

A token x (its D channels) is stored as codes q and a scale s = max|x| / qmax, with q = x / s rounded to the
store's grid (int8: round half to even, clamped to ±127; fp8 e4m3: torch's round-to-nearest cast, clamped to
±448), and read back as q * s. A zero token has s = 0 and q = 0. Per-token (not per-tensor) scales keep the
tokens of outlier channels or images from flattening everyone else's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_SUFFIX = "_scale"  # the scale of key `patches` is stored as `patches_scale`, shape (n, [L,] P)
SCALE_DTYPE = (torch.float32, "F32", 4)


@dataclass(frozen=True)
class Quant:
    """A quantised store dtype."""

    dtype: torch.dtype  # dtype of the codes
    st_dtype: str  # safetensors header name of the codes
    qmax: float  # largest code magnitude: the token's max |x| maps to it
    name: str  # dtype name written into the manifest's `keys`


QUANTS: dict[str, Quant] = {
    "fp8": Quant(torch.float8_e4m3fn, "F8_E4M3", 448.0, "float8_e4m3fn"),  # 3 mantissa bits: ~3 % rel. error
    "int8": Quant(torch.int8, "I8", 127.0, "int8"),  # uniform grid: error <= max|x| / 254 per channel
}


def is_quantised(store: str) -> bool:
    """Whether a store dtype name (fp16, fp8, ...) keeps codes plus per-token scales."""
    return store in QUANTS


def quantise(x: torch.Tensor, store: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (..., D) -> (codes (..., D) in the store's dtype, scales (...,) fp32), on x's device."""
    quant = QUANTS[store]
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / quant.qmax  # (...,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (xf / safe.unsqueeze(-1)).clamp(-quant.qmax, quant.qmax)  # (..., D) in [-qmax, qmax]
    if quant.dtype == torch.int8:
        y = y.round()
    return y.to(quant.dtype), scale


def dequantise(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (..., D) and scales (...,) -> tokens (..., D) in `dtype` (computed in fp32, on codes' device)."""
    x = codes.float() * scale.float().unsqueeze(-1)  # (..., D)
    return x if dtype == torch.float32 else x.to(dtype)
