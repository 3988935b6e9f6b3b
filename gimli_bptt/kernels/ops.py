# SPDX-License-Identifier: Apache-2.0
"""``torch.ops.gimli.*``: finding, building (announced, once) and loading the compiled kernels, and saying what is loaded.

Note [Loading the kernels]: :func:`load` tries, once per process,

1. ops already registered (another import loaded them);
2. the library that ``setup.py`` built at install time next to this package
   (``gimli_bptt/_C_torch_<version>.so``, see :func:`prebuilt_filename`); one built for another
   torch is skipped, since a C++ extension only runs with the torch it was compiled against;
3. the JIT build of the sources (:data:`CSRC`, Note [Building the kernels] in setup.py), cached in
   torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
   under a name that digests the torch version, the sources and the flags
   (:func:`jit_build_dir`): a cached library is loaded as it is, and a missing one is compiled
   once, with one line on stderr when the compile starts and one when it ends. It needs a C++
   compiler and ninja (the ``ninja`` package is a dependency; its binary is used when none is
   on ``PATH``); the CUDA sources are added when torch has CUDA, a GPU is visible and ``nvcc``
   is found.

If all fail, :func:`load` returns False and warns once, naming why (no compiler, no ninja, the
compiler's error); the pure-PyTorch twin (:mod:`gimli_bptt.kernels._reference`) then runs.
``GIMLI_DISABLE_KERNELS=1`` skips loading. :func:`info` says what is loaded, from where, for
which devices, and why not; ``python -m gimli_bptt build-kernels`` builds ahead of time.

This module imports nothing from the package: ``setup.py`` loads it by path for the sources and
the flags, so that the install-time and the JIT build compile the same thing.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

#: The op names, each with its pure-PyTorch twin of the same name in ``_reference``.
OP_NAMES = ("sgd_step", "sgd_step_vjp", "adam_step", "adam_step_vjp")
#: The JIT build's name prefix (a new prefix when the ABI of the ops changes).
JIT_NAME = "gimli_bptt_kernels_v1"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _source_dir() -> Path:
    """The installed package's ``csrc/`` when it holds the sources, else the checkout's top-level ``csrc/``."""
    installed = _PACKAGE_DIR / "csrc"
    return installed if (installed / "gimli.cpp").is_file() else _PACKAGE_DIR.parent / "csrc"


#: The kernel sources (Note [Building the kernels] in setup.py): copied into an installed package, else the checkout's.
CSRC = _source_dir()
#: Compile flags: Note [One source of truth] in csrc/include/gimli/optim_math.h.
#: Tuples: torch's build appends to the lists it is given, so each call gets fresh ones.
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
NVCC_FLAGS = ("-O3", "--fmad=false", "-std=c++17")
LD_FLAGS = ("-fopenmp",)
#: Seconds of one core to compile the CPU sources from cold (the largest file, and all of
#: them), measured on the 2-core CI machine; the announcement's estimate scales them by the
#: cores ninja gets. CUDA_BUILD_SECONDS: the two CUDA files, a rough figure.
CPU_BUILD_SECONDS = (31.0, 116.0)
CUDA_BUILD_SECONDS = 90.0

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "loaded": False, "error": None, "source": None, "library": None,
                          "notes": []}


def disabled() -> bool:
    """Whether ``GIMLI_DISABLE_KERNELS`` forces the pure-PyTorch path."""
    return os.environ.get("GIMLI_DISABLE_KERNELS", "").strip() not in ("", "0", "false", "False")


def _registered() -> bool:
    return all(hasattr(torch.ops.gimli, name) for name in OP_NAMES)


def sources(with_cuda: bool = False) -> list[str]:
    """The C++ (and CUDA) translation units of the extension, absolute paths, in a fixed order.

    Args:
        with_cuda: add the CUDA kernels and their binding.

    Returns:
        ``csrc/gimli.cpp`` (the schemas) and every ``csrc/cpu/*.cpp``; with CUDA also
        ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``.
    """
    srcs = [str(CSRC / "gimli.cpp")] + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(str(CSRC / "cuda" / "*.cu"))) + sorted(glob.glob(str(CSRC / "cuda" / "*.cpp")))
    return srcs


def include_dirs() -> list[str]:
    """The include directories of the extension."""
    return [str(CSRC / "include")]


def cxx_flags(with_cuda: bool = False) -> list[str]:
    """The host compiler's flags, a new list (``-DGIMLI_WITH_CUDA`` when the CUDA binding is compiled)."""
    return list(CXX_FLAGS) + (["-DGIMLI_WITH_CUDA"] if with_cuda else [])


def prebuilt_filename(torch_version: Optional[str] = None) -> str:
    """The file name ``setup.py`` gives the library it builds against ``torch_version``.

    Args:
        torch_version: a ``torch.__version__``; default the one imported.

    Returns:
        For example ``_C_torch_2_13_0_cpu.so``: the torch version is part of the name, so a
        library built for one torch is never loaded into another.
    """
    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch_version or torch.__version__).strip("_")
    suffix = (sysconfig.get_config_var("EXT_SUFFIX") or ".so").rsplit(".", 1)[-1]
    return f"_C_torch_{tag}.{suffix}"


def _want_cuda() -> bool:
    """Whether to build the CUDA sources too: a CUDA build of torch, a GPU, and a CUDA toolkit.

    ``torch.utils.cpp_extension`` (a second or two to import) is imported only when the first
    two hold, so a CPU-only process that loads cached kernels never pays for it.
    """
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _compiler() -> Optional[str]:
    """The C++ compiler torch's build uses (``$CXX``, else ``c++``), or None if it is not found."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _ninja() -> Optional[str]:
    """ninja on ``PATH``, else the binary of the ``ninja`` package, else None."""
    found = shutil.which("ninja")
    if found is not None:
        return found
    try:
        import ninja  # the PyPI package: its binary lies in the package, on PATH only in an activated venv
    except ImportError:
        return None
    exe = Path(ninja.BIN_DIR) / ("ninja.exe" if os.name == "nt" else "ninja")
    return str(exe) if exe.exists() else None


@contextmanager
def _ninja_on_path(ninja: str) -> Iterator[None]:
    """Puts ``ninja``'s folder first on ``PATH`` for the build (torch runs ``ninja`` by name)."""
    old = os.environ.get("PATH", "")
    folder = str(Path(ninja).parent)
    if shutil.which("ninja") is None:
        os.environ["PATH"] = folder + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _digest(with_cuda: bool) -> str:
    """What the JIT build depends on: Python, the torch build, the sources (every file under csrc/) and the flags."""
    h = hashlib.sha256()
    for part in (sys.implementation.cache_tag, torch.__version__, str(torch.version.git_version), str(torch.version.cuda), str(with_cuda),
                 " ".join(cxx_flags(with_cuda) + list(NVCC_FLAGS) + list(LD_FLAGS))):
        h.update(part.encode() + b"\0")
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def jit_name(with_cuda: Optional[bool] = None) -> str:
    """The JIT build's name for this torch, these sources and flags (``with_cuda``: default as the build would)."""
    with_cuda = _want_cuda() if with_cuda is None else with_cuda
    return f"{JIT_NAME}{'_cuda' if with_cuda else ''}_{_digest(with_cuda)}"


def jit_build_dir(with_cuda: Optional[bool] = None) -> Path:
    """Where the JIT build compiles and caches the library: ``$TORCH_EXTENSIONS_DIR/<jit_name>``, by default
    ``~/.cache/torch_extensions/<jit_name>`` (the name tells Python, torch and sources apart)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / jit_name(with_cuda)


def _jit_library(with_cuda: bool) -> Path:
    return jit_build_dir(with_cuda) / f"{jit_name(with_cuda)}.so"


def estimated_build_seconds(with_cuda: bool = False) -> int:
    """About how long a cold JIT build takes here (from CPU_BUILD_SECONDS and the cores ninja gets)."""
    largest, total = CPU_BUILD_SECONDS
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or cores
    seconds = max(largest, total / max(1, min(jobs, cores))) + (CUDA_BUILD_SECONDS if with_cuda else 0.0)
    return int(round(seconds / 10.0) * 10) or 10


class KernelsUnavailable(RuntimeError):
    """The compiled kernels cannot be loaded here; the message says why and what to do."""


class _NotBuiltYet(KernelsUnavailable):
    """Neither an install-time nor a cached JIT build is there, and ``load(build=False)`` may not compile."""


def _toolchain_missing() -> Optional[str]:
    if _compiler() is None:
        return (f"no C++ compiler: {os.environ.get('CXX', 'c++')} was not found "
                "(install g++ or clang++, or set CXX)")
    if _ninja() is None:
        return "ninja was not found (pip install ninja)"
    return None


def _jit_build(verbose: bool) -> Path:
    """Compiles the shipped sources into the cache, announced on stderr; returns the library."""
    from torch.utils import cpp_extension

    if not (CSRC / "gimli.cpp").exists():
        raise KernelsUnavailable(f"no kernel sources at {CSRC}: the installed package is incomplete, reinstall gimli_bptt")
    missing = _toolchain_missing()
    if missing is not None:
        raise KernelsUnavailable(missing)
    with_cuda = _want_cuda()
    name, build_dir = jit_name(with_cuda), jit_build_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"gimli_bptt: compiling the fused optimizer kernels once for torch {torch.__version__}"
          f"{' with CUDA' if with_cuda else ''} (about {estimated_build_seconds(with_cuda)} s); cached in {build_dir}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with _ninja_on_path(str(_ninja())):
            cpp_extension.load(
                name=name,
                sources=sources(with_cuda),
                extra_include_paths=include_dirs(),
                extra_cflags=cxx_flags(with_cuda),
                extra_cuda_cflags=list(NVCC_FLAGS),
                extra_ldflags=list(LD_FLAGS),
                build_directory=str(build_dir),
                is_python_module=False,
                with_cuda=with_cuda,
                verbose=verbose,
            )
    except Exception as e:
        print(f"gimli_bptt: compiling the fused optimizer kernels failed after {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
        raise KernelsUnavailable(
            f"compiling the kernels failed ({type(e).__name__}: {_first_line(e)}); "
            "`python -m gimli_bptt build-kernels --verbose` shows the compiler's output") from e
    library = build_dir / f"{name}.so"
    print(f"gimli_bptt: fused optimizer kernels compiled in {time.perf_counter() - start:.0f} s: {library}",
          file=sys.stderr, flush=True)
    return library


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _find_and_load(build: bool, verbose: bool) -> tuple[str, Optional[str]]:
    """Note [Loading the kernels]; returns (source, library path). Raises KernelsUnavailable."""
    notes: list[str] = _state["notes"]
    if _registered():
        return "registered", None
    wanted = _PACKAGE_DIR / prebuilt_filename()
    for other in sorted(set(glob.glob(str(_PACKAGE_DIR / "_C*.so"))) - {str(wanted)}):
        notes.append(f"ignored {other}: built for another torch than {torch.__version__}")
    if wanted.exists():
        try:
            torch.ops.load_library(str(wanted))
            return "prebuilt", str(wanted)
        except OSError as e:
            notes.append(f"the library built at install ({wanted}) did not load ({_first_line(e)}); using the JIT build")
    with_cuda = _want_cuda()
    cached = _jit_library(with_cuda)
    if cached.exists():
        try:
            torch.ops.load_library(str(cached))
            return "jit", str(cached)
        except OSError as e:
            notes.append(f"the cached JIT build ({cached}) did not load ({_first_line(e)}); compiling it again")
            cached.unlink(missing_ok=True)  # else ninja takes it for up to date
    if not build:
        raise _NotBuiltYet(
            f"not built yet for torch {torch.__version__}: the first use compiles them (about "
            f"{estimated_build_seconds(with_cuda)} s), or run `python -m gimli_bptt build-kernels`")
    return "jit", str(_jit_build(verbose))


def load(build: bool = True, verbose: bool = False) -> bool:
    """Loads the compiled ops once (Note [Loading the kernels]).

    Args:
        build: compile them if neither an install-time nor a cached JIT build is there. With
            ``build=False`` a missing build is no failure: a later ``load()`` still compiles.
        verbose: show the compiler's commands and output.

    Returns:
        Whether the ops are loaded. On the first failure it warns once (RuntimeWarning) saying why.
    """
    if _state["loaded"]:
        return True
    if disabled():
        return False
    with _lock:
        if _state["tried"]:
            return bool(_state["loaded"])
        _state["notes"] = []
        try:
            source, library = _find_and_load(build, verbose)
            if not _registered():
                raise KernelsUnavailable(f"{library} did not register torch.ops.gimli")
        except _NotBuiltYet as e:  # no failure: a later load() compiles them
            _state["error"] = e
        except Exception as e:  # noqa: BLE001 - any build or load failure means: run the twin
            _fail(e)
        else:
            _state.update(tried=True, loaded=True, error=None, source=source, library=library)
    return bool(_state["loaded"])


def _fail(e: BaseException) -> None:
    _state.update(tried=True, loaded=False, error=e)
    what = str(e) if isinstance(e, KernelsUnavailable) else f"{type(e).__name__}: {_first_line(e)}"
    warnings.warn(f"gimli_bptt: fused kernels unavailable ({what}); using the pure-PyTorch path. "
                  "Set GIMLI_DISABLE_KERNELS=1 to silence this.", RuntimeWarning, stacklevel=4)


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


def _devices() -> tuple[str, ...]:
    if not _registered():
        return ()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                 if all(has(f"gimli::{name}", key) for name in OP_NAMES))


def _why_no_cuda(devices: tuple[str, ...]) -> Optional[str]:
    if "cuda" in devices:
        return None
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    if not torch.cuda.is_available():
        return "no GPU is visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME) when the kernels were built"
    return "the library was built without the CUDA sources"


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """What :func:`info` reports about the compiled kernels.

    Attributes:
        loaded: the ops are registered in this process.
        source: ``"prebuilt"`` (built at install), ``"jit"`` (the cached JIT build),
            ``"registered"`` (loaded by someone else) or None.
        library: the loaded library's path, if known.
        devices: the device types with kernels (``("cpu",)``, ``("cpu", "cuda")``).
        torch_version: the running torch.
        disabled: ``GIMLI_DISABLE_KERNELS`` is set.
        reason: why they are not loaded (None when loaded).
        no_cuda: why there are no CUDA kernels (None when there are).
        notes: libraries skipped on the way and why.
        sources: the folder of the kernel sources (and whether it is there).
        prebuilt: the install-time library this torch would load.
        cache: the JIT build's folder for this torch and these sources; ``cached``: its library is there.
        compiler, ninja: the tools a JIT build would use (None: not found).
    """

    loaded: bool
    source: Optional[str]
    library: Optional[str]
    devices: tuple[str, ...]
    torch_version: str
    disabled: bool
    reason: Optional[str]
    no_cuda: Optional[str]
    notes: tuple[str, ...]
    sources: str
    sources_present: bool
    prebuilt: str
    cache: str
    cached: bool
    compiler: Optional[str]
    ninja: Optional[str]

    def __str__(self) -> str:
        status = (f"loaded ({self.source}) from {self.library or 'an earlier load'}" if self.loaded
                  else f"not loaded: {self.reason}")
        lines = [
            f"fused kernels: {status}",
            f"devices: {', '.join(self.devices) if self.devices else 'none'}"
            + (f" (no CUDA: {self.no_cuda})" if self.no_cuda else ""),
            f"torch: {self.torch_version}",
            f"sources: {self.sources}" + ("" if self.sources_present else " (missing)"),
            f"install-time build: {self.prebuilt}" + (" (present)" if Path(self.prebuilt).exists() else " (none)"),
            f"JIT cache: {self.cache}" + (" (built)" if self.cached else " (not built)"),
            f"compiler: {self.compiler or 'not found'}; ninja: {self.ninja or 'not found'}",
        ]
        if self.disabled:
            lines.append("GIMLI_DISABLE_KERNELS is set: the pure-PyTorch path runs")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def info(load_now: bool = True) -> KernelInfo:
    """What is loaded, from where, for which devices, and why not.

    Args:
        load_now: first load an install-time or cached JIT build if there is one; this never
            compiles (``python -m gimli_bptt build-kernels`` or the first use does).

    Returns:
        A :class:`KernelInfo`; ``str()`` of it is the report ``build-kernels --info`` prints.
    """
    if load_now and not disabled():
        load(build=False)
    with_cuda = _want_cuda()
    devices = _devices()
    loaded = bool(_state["loaded"]) or _registered()
    err = _state["error"]
    if loaded:
        reason = None
    elif disabled():
        reason = "GIMLI_DISABLE_KERNELS is set"
    elif err is not None:
        reason = str(err) if isinstance(err, KernelsUnavailable) else f"{type(err).__name__}: {_first_line(err)}"
    else:
        reason = "not loaded yet in this process (the first use loads them)"
    return KernelInfo(
        loaded=loaded, source=_state["source"] if loaded else None, library=_state["library"], devices=devices,
        torch_version=torch.__version__, disabled=disabled(), reason=reason,
        no_cuda=_why_no_cuda(devices) if loaded else None, notes=tuple(_state["notes"]),
        sources=str(CSRC), sources_present=(CSRC / "gimli.cpp").exists(),
        prebuilt=str(_PACKAGE_DIR / prebuilt_filename()), cache=str(jit_build_dir(with_cuda)),
        cached=_jit_library(with_cuda).exists(), compiler=_compiler(), ninja=_ninja())


def build(verbose: bool = False) -> KernelInfo:
    """Builds (if needed) and loads the kernels now, ahead of their first use.

    Args:
        verbose: show the compiler's commands and output.

    Returns:
        The :class:`KernelInfo` after the attempt (``loaded`` says whether it worked).

    Raises:
        KernelsUnavailable: ``GIMLI_DISABLE_KERNELS`` is set (unset it to build).
    """
    if disabled():
        raise KernelsUnavailable("GIMLI_DISABLE_KERNELS is set: unset it to build the kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the caller reports the reason
        load(build=True, verbose=verbose)
    return info(load_now=False)


__all__ = ["CSRC", "CXX_FLAGS", "KernelInfo", "KernelsUnavailable", "LD_FLAGS", "NVCC_FLAGS", "OP_NAMES", "build",
           "cxx_flags", "disabled", "estimated_build_seconds", "include_dirs", "info", "jit_build_dir", "jit_name",
           "load", "load_error", "op", "prebuilt_filename", "sources"]
