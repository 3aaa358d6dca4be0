"""Every CUDA source compiles where a CUDA toolkit exists, even with a CPU-only torch (the CI machine).

The kernels (csrc/cuda/*.cu) are torch-free, so plain `nvcc -c` builds them; the torch glue
(csrc/cuda/*.cpp, and csrc/*.cpp with MEGAGLOT_WITH_CUDA) gets a host-compiler syntax check against
the installed torch headers and the toolkit's runtime headers. Nothing here can run a kernel.
All compiles start at once (module fixture) so the wall time is that of the slowest one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_SOURCES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
# Torch-free GPU benchmark harnesses that include the kernels (benchmarks/cuda): they must keep building too.
CU_SOURCES += sorted(glob.glob(os.path.join(ROOT, "benchmarks", "cuda", "*.cu")))
GLUE_SOURCES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))) + [
    os.path.join(CSRC, "softmax.cpp"), os.path.join(CSRC, "rotary.cpp")]


def _cuda_home():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home, os.path.join(home, "bin", "nvcc")
    return None, None


CUDA_HOME, NVCC = _cuda_home()
pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc (CUDA toolkit) on this machine")


def _glue_command(source: str) -> list:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    include_dir = os.path.join(CUDA_HOME, "include")
    if not os.path.exists(os.path.join(include_dir, "cuda_runtime_api.h")):  # e.g. /usr/local/bin/nvcc shim
        include_dir = "/usr/local/cuda/include"
    return [cxx, "-fsyntax-only", "-std=c++17", "-DMEGAGLOT_WITH_CUDA=1", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-DTORCH_EXTENSION_NAME=_C", *includes, f"-I{sysconfig.get_paths()['include']}", f"-I{include_dir}",
            f"-I{CSRC}", source]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Start every compile in parallel; {source: (returncode, output)}."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    arch = os.environ.get("MEGAGLOT_NVCC_ARCH", "sm_80")
    procs = {}
    for source in CU_SOURCES:
        obj = out_dir / (os.path.basename(source) + ".o")
        cmd = [NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", f"-arch={arch}", f"-I{CSRC}", source,
               "-o", str(obj)]
        procs[source] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for source in GLUE_SOURCES:
        procs["glue:" + source] = subprocess.Popen(_glue_command(source), stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True)
    return {key: (proc.wait(timeout=600), proc.stdout.read()) for key, proc in procs.items()}


def test_there_are_cuda_sources():
    assert CU_SOURCES, "csrc/cuda/*.cu is empty"


@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cu_compiles_with_plain_nvcc(compiled, source):
    code, output = compiled[source]
    assert code == 0, f"nvcc -c {os.path.relpath(source, ROOT)} failed:\n{output}"


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda s: os.path.relpath(s, CSRC))
def test_cuda_glue_parses(compiled, source):
    assert shutil.which(os.environ.get("CXX", "c++")), "no host C++ compiler (the extension cannot build either)"
    code, output = compiled["glue:" + source]
    errors = [line for line in output.splitlines() if "error" in line]
    assert code == 0, f"{os.path.relpath(source, ROOT)} does not compile with MEGAGLOT_WITH_CUDA:\n" + "\n".join(
        errors[:20] or output.splitlines()[-20:])
