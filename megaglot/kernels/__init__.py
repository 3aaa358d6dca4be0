"""Python face of the compiled csrc/ extension: availability and (in later modules) the fused kernels."""

from megaglot.kernels.extension import available, load_extension

__all__ = ["available", "load_extension"]
