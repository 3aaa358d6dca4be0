"""Finding the compiled extension megaglot._C: the installed build, else a JIT build with ninja.

A checkout that was never `pip install`ed still gets the C++ paths (the JIT build is cached
under torch's extension directory, so only the first import compiles). When neither works the
callers fall back to pure torch, with one warning.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings
from types import ModuleType
from typing import Optional

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[ModuleType]:
    """The compiled module, or None (with one warning saying why) when it cannot be had."""
    try:
        from megaglot import _C  # built by setup.py

        return _C
    except ImportError as installed_error:
        reason = f"megaglot._C is not built ({installed_error})"
    if os.environ.get("MEGAGLOT_NO_JIT") != "1" and os.path.isdir(_CSRC):
        try:
            from torch.utils import cpp_extension

            return _jit_build(cpp_extension)
        except Exception as jit_error:  # a compiler error is reported, not raised: torch paths remain
            reason += f"; JIT build failed: {jit_error}"
    warnings.warn(f"{reason}; using the pure-torch/numpy fallbacks (slower). Run `make setup` to build it.",
                  RuntimeWarning, stacklevel=2)
    return None


def _jit_build(cpp_extension) -> ModuleType:
    """JIT-compile csrc/ like setup.py does: the CUDA sources too where a CUDA torch and toolkit exist."""
    import torch

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    cflags = ["-O3", "-std=c++17"]
    with_cuda = (os.environ.get("MEGAGLOT_NO_CUDA") != "1" and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if not with_cuda:
        return cpp_extension.load("megaglot_C_jit", sources, extra_include_paths=[_CSRC], extra_cflags=cflags,
                                  verbose=False)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
    define = ["-DMEGAGLOT_WITH_CUDA=1"]
    return cpp_extension.load("megaglot_C_jit_cuda", sources, extra_include_paths=[_CSRC],
                              extra_cflags=cflags + define,
                              extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"] + define,
                              with_cuda=True, verbose=False)


def available() -> dict:
    """What was built and runs here: {'extension': bool, 'cuda': bool, 'functions': [...], 'cpu_isa': str}.
    cpu_isa is the instruction set of the CPU softmax rows (avx512, avx2 or baseline; None without
    the extension): the best this CPU runs, capped by MEGAGLOT_CPU_ISA."""
    ext = load_extension()
    if ext is None:
        return {"extension": False, "cuda": False, "functions": [], "cpu_isa": None}
    functions = sorted(name for name in dir(ext) if not name.startswith("_"))
    cpu_isa = ext.cpu_softmax_isa() if hasattr(ext, "cpu_softmax_isa") else None
    return {"extension": True, "cuda": bool(getattr(ext, "with_cuda", lambda: False)()),
            "functions": functions, "cpu_isa": cpu_isa}


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel_for(name: str, tensor, what: str):
    """The compiled function `name` for this tensor's device, or None (one warning) to use pure torch."""
    ext = load_extension()  # warns once by itself when there is no extension at all
    if ext is None:
        return None
    fn = getattr(ext, name, None)
    if fn is None:
        warn_once(f"megaglot._C has no {name} (a stale build?); using pure torch. Rebuild with `make setup`.")
        return None
    if str(tensor.dtype) == "torch.float64" and tensor.device.type != "cpu":
        return None  # float64 exists for gradcheck; off the CPU it is computed in pure torch
    if tensor.device.type == "cuda" and not ext.with_cuda():
        warn_once(f"megaglot._C was built without CUDA; {what} runs in pure torch on CUDA tensors.")
        return None
    if tensor.device.type not in ("cpu", "cuda"):
        warn_once(f"no {what} for device type {tensor.device.type}; using pure torch.")
        return None
    return fn
