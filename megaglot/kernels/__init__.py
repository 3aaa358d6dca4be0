"""Python face of the compiled csrc/ extension: availability, fused softmax variants, fused rotary."""

from megaglot.kernels.extension import available, load_extension
from megaglot.kernels.rotary import apply_rotary_torch, fused_rotary, rotary_cos_sin
from megaglot.kernels.softmax import scaled_masked_softmax, scaled_softmax, scaled_upper_triang_masked_softmax

__all__ = [
    "available",
    "load_extension",
    "scaled_upper_triang_masked_softmax",
    "scaled_masked_softmax",
    "scaled_softmax",
    "rotary_cos_sin",
    "fused_rotary",
    "apply_rotary_torch",
]
