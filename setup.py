"""Build megaglot and its compiled extension megaglot._C.

CPU sources (csrc/*.cpp) always; CUDA sources (csrc/cuda/*.cu, *.cpp) only where both a CUDA
toolkit and a CUDA build of torch exist. Install with `pip install -e . --no-build-isolation`
after torch, so pip never fetches a second (multi-GB) torch into an isolated build environment.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_build_possible() -> bool:
    import torch

    if os.environ.get("MEGAGLOT_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    if cuda_build_possible():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "megaglot._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("MEGAGLOT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    return cpp_extension.CppExtension(
        "megaglot._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags})


setup(
    name="megaglot",
    version="0.1.0",
    description="Megatron-style 3D-parallel training of Polyglot-Ko-style GPT-NeoX models",
    packages=find_packages(include=["megaglot", "megaglot.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy", "pybind11", "ninja", "regex", "tensorboard", "safetensors",
                      "tokenizers", "tqdm"],
    extras_require={"test": ["pytest", "transformers"], "eval": ["lm-eval"]},
    ext_modules=[extension()],
    # lm-eval has no plugin hook: this launcher imports the adapter (registering "megaglot") first.
    entry_points={"console_scripts": ["megaglot-lm-eval = megaglot.eval.harness:main"]},
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
