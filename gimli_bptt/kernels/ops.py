# SPDX-License-Identifier: Apache-2.0
"""``torch.ops.gimli.*``: lazy loading of the compiled kernels (setup.py build, else a cached JIT build).

Note [Loading the kernels]: :func:`load` tries, once per process,

1. ops already registered (another import loaded them);
2. the library that ``setup.py`` built next to this package (``gimli_bptt/_C*.so``);
3. a JIT build of ``csrc/`` with :func:`torch.utils.cpp_extension.load`, cached in torch's
   extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
   rebuilt only when a source or a flag changes. It needs a source checkout (``csrc/`` beside
   the package), a C++ compiler and ninja; the CUDA sources are added when torch has CUDA and
   ``nvcc`` is found.

If all fail, :func:`load` returns False and warns once; the pure-PyTorch twin
(:mod:`gimli_bptt.kernels._reference`) then runs. ``GIMLI_DISABLE_KERNELS=1`` skips loading.
"""
from __future__ import annotations

import glob
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

#: The op names, each with its pure-PyTorch twin of the same name in ``_reference``.
OP_NAMES = ("sgd_step", "sgd_step_vjp", "adam_step", "adam_step_vjp")
#: The JIT build's name (a new name when the ABI of the ops changes).
JIT_NAME = "gimli_bptt_kernels_v1"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
CSRC = _PACKAGE_DIR / "csrc"
#: Compile flags: Note [One source of truth] in csrc/include/gimli/optim_math.h.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17"]

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "loaded": False, "error": None, "source": None}


def disabled() -> bool:
    """Whether ``GIMLI_DISABLE_KERNELS`` forces the pure-PyTorch path."""
    return os.environ.get("GIMLI_DISABLE_KERNELS", "").strip() not in ("", "0", "false", "False")


def _registered() -> bool:
    try:
        return all(hasattr(torch.ops.gimli, name) for name in OP_NAMES)
    except (AttributeError, RuntimeError):
        return False


def sources(with_cuda: bool = False) -> list[str]:
    """The C++ (and CUDA) sources of the extension."""
    srcs = [str(CSRC / "gimli.cpp"), str(CSRC / "cpu" / "optim_cpu.cpp")]
    if with_cuda:
        srcs += [str(CSRC / "cuda" / "optim_cuda.cu"), str(CSRC / "cuda" / "optim_cuda_binding.cpp")]
    return srcs


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _jit_build(verbose: bool = False) -> str:
    from torch.utils import cpp_extension

    if not (CSRC / "gimli.cpp").exists():
        raise FileNotFoundError(f"no kernel sources at {CSRC} (the JIT build needs a source checkout)")
    with_cuda = _want_cuda()
    cpp_extension.load(
        name=JIT_NAME + ("_cuda" if with_cuda else ""),
        sources=sources(with_cuda),
        extra_include_paths=[str(CSRC / "include")],
        extra_cflags=CXX_FLAGS + (["-DGIMLI_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=NVCC_FLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        with_cuda=with_cuda,
        verbose=verbose,
    )
    return "jit" + ("+cuda" if with_cuda else "")


def load(build: bool = True, verbose: bool = False) -> bool:
    """Loads the compiled ops once (Note [Loading the kernels]); returns whether they are there."""
    if _state["loaded"]:
        return True
    if disabled():
        return False
    with _lock:
        if _state["tried"]:
            return bool(_state["loaded"])
        _state["tried"] = True
        try:
            if _registered():
                _state["source"] = "registered"
            else:
                built = sorted(glob.glob(str(_PACKAGE_DIR / "_C*.so")))
                if built:
                    torch.ops.load_library(built[0])
                    _state["source"] = built[0]
                elif build:
                    _state["source"] = _jit_build(verbose)
            _state["loaded"] = _registered()
            if not _state["loaded"]:
                raise RuntimeError("the compiled library did not register torch.ops.gimli")
        except Exception as e:  # noqa: BLE001 - any build or load failure means: run the twin
            _state["error"] = e
            warnings.warn(
                f"gimli_bptt: fused kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "using the pure-PyTorch path. Set GIMLI_DISABLE_KERNELS=1 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    return bool(_state["loaded"])


def load_error() -> Optional[BaseException]:
    """Why the last :func:`load` failed (None if it did not fail)."""
    return _state["error"]


def op(name: str) -> Any:
    """The compiled op ``torch.ops.gimli.<name>``; loads the library first.

    Raises:
        RuntimeError: the kernels cannot be loaded (the message says why).
    """
    if not load():
        why = "GIMLI_DISABLE_KERNELS is set" if disabled() else repr(load_error())
        raise RuntimeError(f"gimli_bptt fused kernels are unavailable: {why}")
    return getattr(torch.ops.gimli, name)


__all__ = ["CSRC", "CXX_FLAGS", "NVCC_FLAGS", "OP_NAMES", "disabled", "load", "load_error", "op", "sources"]
