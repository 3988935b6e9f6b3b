# SPDX-License-Identifier: Apache-2.0
"""Build script: package metadata lives in pyproject.toml; this file adds the compiled kernels when it can.

Note [Building the kernels]: the extension ``gimli_bptt._C`` (gimli_bptt/csrc/) needs torch at build
time. Under pip's default build isolation torch is not importable here, so a plain
``pip install -e .`` installs the pure-Python package only, and the kernels are JIT-built and
cached on first use (gimli_bptt/kernels/ops.py). To build them at install time instead, install
torch first and run ``pip install --no-build-isolation -e .``. The CUDA sources are added when
torch has CUDA and nvcc is found. ``GIMLI_BUILD_KERNELS=0`` skips the extension. A failed
compile never fails the install: the package then falls back to the JIT build, then to the
pure-PyTorch path with one warning.
"""
import os
import sys

from setuptools import setup


def _ext_modules():
    if os.environ.get("GIMLI_BUILD_KERNELS", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("gimli_bptt: torch not importable at build time; kernels will be JIT-built on first use", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    sources = ["gimli_bptt/csrc/gimli.cpp", "gimli_bptt/csrc/cpu/optim_cpu.cpp"]
    kwargs = dict(include_dirs=[os.path.join(here, "gimli_bptt", "csrc", "include")], extra_link_args=["-fopenmp"])
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        sources += ["gimli_bptt/csrc/cuda/optim_cuda.cu", "gimli_bptt/csrc/cuda/optim_cuda_binding.cpp"]
        ext = cpp_extension.CUDAExtension(
            "gimli_bptt._C", sources,
            extra_compile_args={"cxx": cxx + ["-DGIMLI_WITH_CUDA"], "nvcc": ["-O3", "--fmad=false", "-std=c++17"]},
            **kwargs)
    else:
        ext = cpp_extension.CppExtension("gimli_bptt._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - never fail the install (Note [Building the kernels])
                print(f"gimli_bptt: building the kernels failed ({e}); they will be JIT-built on first use",
                      file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
