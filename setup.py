# SPDX-License-Identifier: Apache-2.0
"""Build script: package metadata lives in pyproject.toml; this file adds the compiled kernels when torch is importable.

Note [Building the kernels]: the kernel sources are tracked once, in the top-level ``csrc/``; the
sdist carries that folder (``MANIFEST.in``) and :class:`BuildPy` copies it into the package as
``gimli_bptt/csrc/`` in every wheel and install, so every install can compile them (an editable
install reads the checkout's ``csrc/``: ``kernels/ops.py`` takes the installed package's
``csrc/`` when it holds the sources, else the checkout's). Where torch is importable at build time
(``pip install --no-build-isolation .`` or ``-e .`` with torch installed first), the extension
is compiled here, at install, into ``gimli_bptt/_C_torch_<version>.so`` (the torch version is in
the name: a C++ extension runs only with the torch it was compiled against). Under pip's
default build isolation torch is not importable here, so the package installs without it and
the kernels are JIT-compiled from site-packages on first use, once, and cached
(``gimli_bptt/kernels/ops.py``, Note [Loading the kernels]). Both builds take their sources and
flags from ``ops.py``, loaded here by path. The CUDA sources are added when torch has CUDA and
nvcc is found. ``GIMLI_BUILD_KERNELS=0`` skips the extension. A failed compile never fails
the install: the package then JIT-builds on first use, or warns once and runs the
pure-PyTorch path.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
#: The kernel sources in the checkout (or the unpacked sdist), and where they go in the package.
CSRC = os.path.join(HERE, "csrc")
PACKAGE_CSRC = os.path.join("gimli_bptt", "csrc")


class BuildPy(build_py):
    """``build_py`` that also copies the top-level ``csrc/`` into ``<build_lib>/gimli_bptt/csrc``
    (Note [Building the kernels]); an editable install skips the copy (it reads ``csrc/`` in place)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not os.path.isfile(os.path.join(CSRC, "gimli.cpp")):
            raise SystemExit(f"gimli_bptt: the kernel sources are missing ({CSRC}); build from a full checkout or sdist")
        target = os.path.join(self.build_lib, PACKAGE_CSRC)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            for root, _, files in os.walk(CSRC):
                rel = os.path.relpath(root, CSRC)
                outputs += [os.path.normpath(os.path.join(self.build_lib, PACKAGE_CSRC, rel, f)) for f in files
                            if not f.endswith((".o", ".so"))]
        return outputs


def _kernel_ops():
    """``gimli_bptt/kernels/ops.py`` as a module of its own (it needs torch, not the package)."""
    path = os.path.join(HERE, "gimli_bptt", "kernels", "ops.py")
    spec = importlib.util.spec_from_file_location("_gimli_bptt_kernel_ops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _ext_modules():
    if os.environ.get("GIMLI_BUILD_KERNELS", "1") == "0":
        return [], {"build_py": BuildPy}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("gimli_bptt: torch is not importable at build time; the kernels will be compiled on first use",
              file=sys.stderr)
        return [], {"build_py": BuildPy}
    ops = _kernel_ops()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = [os.path.relpath(s, HERE) for s in ops.sources(with_cuda)]
    kwargs = dict(include_dirs=ops.include_dirs(), extra_link_args=list(ops.LD_FLAGS))
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "gimli_bptt._C", sources, extra_compile_args={"cxx": ops.cxx_flags(True) + ["-g0"], "nvcc": list(ops.NVCC_FLAGS)},
            **kwargs)
    else:
        # -g0: no debug information (setuptools adds Python's -g, which only slows the compile down)
        ext = cpp_extension.CppExtension("gimli_bptt._C", sources, extra_compile_args={"cxx": ops.cxx_flags(False) + ["-g0"]},
                                         **kwargs)
    filename = ops.prebuilt_filename(torch.__version__)

    class BuildExt(cpp_extension.BuildExtension):
        def get_ext_filename(self, ext_name):
            # setuptools asks with the full name or with its last part, depending on the caller
            default = super().get_ext_filename(ext_name)
            ours = ext_name in ("gimli_bptt._C", "_C")
            return os.path.join(os.path.dirname(default), filename) if ours else default

        def run(self):
            print(f"gimli_bptt: compiling the fused optimizer kernels for torch {torch.__version__} at install "
                  f"(about {ops.estimated_build_seconds(with_cuda)} s)", file=sys.stderr)
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - never fail the install (Note [Building the kernels])
                print(f"gimli_bptt: compiling the kernels at install failed ({e}); they will be compiled on first use",
                      file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=True), "build_py": BuildPy}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
