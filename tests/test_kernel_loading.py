# SPDX-License-Identifier: Apache-2.0
"""Finding, building and reporting the compiled kernels: package data, the announced build, one clear warning, info(), build-kernels.

What an installed package does end to end (a wheel and an sdist, non-editable, in a fresh
venv, the source tree deleted) is checked by ``.ci/check_install.py``, run by ``.ci/run``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from gimli_bptt import kernels
from gimli_bptt.__main__ import main
from gimli_bptt.kernels import ops

ROOT = Path(__file__).resolve().parent.parent


def _fresh_state() -> dict[str, Any]:
    return {"tried": False, "loaded": False, "error": None, "source": None, "library": None, "notes": []}


def test_every_kernel_source_reaches_the_package(tmp_path: Path) -> None:
    """The sources are tracked once in the top-level csrc/: the sdist grafts it (MANIFEST.in) and
    setup.py's build_py copies every file of it into the package as gimli_bptt/csrc/ (wheels, installs)."""
    assert "graft csrc" in (ROOT / "MANIFEST.in").read_text().splitlines()
    assert not (ROOT / "gimli_bptt" / "csrc").exists(), "a second copy of the sources inside the package"
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                           env={**os.environ, "GIMLI_BUILD_KERNELS": "0"}, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    files = {p.relative_to(ROOT / "csrc") for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    copied = {p.relative_to(tmp_path / "gimli_bptt" / "csrc") for p in (tmp_path / "gimli_bptt" / "csrc").rglob("*")
              if p.is_file()}
    assert files and files == copied, f"not copied: {sorted(files - copied)}; extra: {sorted(copied - files)}"


def test_sources_are_found_installed_first_else_in_the_checkout(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed package's csrc/ when it holds the sources, else the checkout's (Note [Building the kernels])."""
    package = tmp_path / "site" / "gimli_bptt"
    (package / "csrc").mkdir(parents=True)
    monkeypatch.setattr(ops, "_PACKAGE_DIR", package)
    assert ops._source_dir() == tmp_path / "site" / "csrc"  # an empty csrc/ in the package is not the sources
    (package / "csrc" / "gimli.cpp").write_text("")
    assert ops._source_dir() == package / "csrc"
    monkeypatch.undo()
    assert ops.CSRC == ops._source_dir() and (ops.CSRC / "gimli.cpp").is_file()


def test_sources_exist_and_cover_every_cpu_file() -> None:
    srcs = [Path(s) for s in ops.sources(with_cuda=True)]
    assert all(s.is_file() for s in srcs)
    assert {p.name for p in (ops.CSRC / "cpu").glob("*.cpp")} <= {s.name for s in srcs}
    assert ops.sources()[0].endswith("gimli.cpp") and not any(s.endswith(".cu") for s in ops.sources())


def test_prebuilt_name_carries_the_torch_version() -> None:
    assert ops.prebuilt_filename("2.13.0+cpu") == "_C_torch_2_13_0_cpu.so"
    assert ops.prebuilt_filename("2.14.1") != ops.prebuilt_filename("2.13.0")
    assert ops.prebuilt_filename() == ops.prebuilt_filename(torch.__version__)


def test_jit_name_digests_sources_and_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = ops.jit_name(False)
    assert name.startswith(ops.JIT_NAME) and name == ops.jit_name(False)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert ops.jit_name(False) != name  # another torch never reuses (or thrashes) this cache
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ops.jit_build_dir(False) == tmp_path / name


@pytest.mark.skipif(os.environ.get("GIMLI_DISABLE_KERNELS") == "1", reason="GIMLI_DISABLE_KERNELS=1")
def test_info_reports_what_is_loaded() -> None:
    assert kernels.is_available("cpu"), ops.load_error()
    rep = kernels.info()
    assert rep.loaded and rep.reason is None and "cpu" in rep.devices
    assert rep.source in ("prebuilt", "jit", "registered") and rep.sources_present
    text = str(rep)
    assert text.startswith("fused kernels: loaded") and "devices: cpu" in text
    if not torch.cuda.is_available():
        assert rep.no_cuda in ("this torch has no CUDA", "no GPU is visible to torch")


def test_the_jit_build_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """One line on stderr when the compile starts (torch, estimate, cache) and one when it ends."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []

    def fake_load(**kw: Any) -> None:  # what cpp_extension.load leaves behind: the library in the build folder
        calls.append(kw)
        assert tmp_path in Path(kw["build_directory"]).parents  # never into the real cache
        (Path(kw["build_directory"]) / f"{kw['name']}.so").write_bytes(b"")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    library = ops._jit_build(verbose=False)
    # ours only: a CUDA build of torch (2.14.1 from the registry) on a machine without a GPU also logs
    # "No CUDA runtime is found, using CUDA_HOME=..." to stderr when cpp_extension is first imported
    err = [line for line in capsys.readouterr().err.splitlines() if "torch/utils/cpp_extension.py" not in line]
    assert len(err) == 2, err
    assert err[0].startswith(f"gimli_bptt: compiling the fused optimizer kernels once for torch {torch.__version__}")
    assert f"(about {ops.estimated_build_seconds(False)} s); cached in {tmp_path}" in err[0]
    assert err[1].startswith("gimli_bptt: fused optimizer kernels compiled in") and str(library) in err[1]
    assert calls[0]["sources"] == ops.sources(False) and calls[0]["extra_cflags"] == ops.cxx_flags(False)

    def failing_load(**kw: Any) -> None:
        raise RuntimeError("Error building extension 'x': g++: fatal error")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(ops.KernelsUnavailable, match="compiling the kernels failed .*Error building extension"):
        ops._jit_build(verbose=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("gimli_bptt: compiling the fused optimizer kernels failed after")


@pytest.mark.parametrize("missing", ["compiler", "ninja"])
def test_one_clear_warning_names_the_missing_tool(missing: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No prebuilt or cached library and no toolchain: load() warns once, naming the tool, and returns False."""
    monkeypatch.delenv("GIMLI_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(ops, "_state", _fresh_state())
    monkeypatch.setattr(ops, "_registered", lambda: False)
    monkeypatch.setattr(ops, "_PACKAGE_DIR", tmp_path)  # no library built at install
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))  # nothing cached
    if missing == "compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
        expected = "no C\\+\\+ compiler"
    else:
        monkeypatch.setattr(ops, "_ninja", lambda: None)
        expected = "ninja was not found \\(pip install ninja\\)"
    with pytest.warns(RuntimeWarning, match=f"gimli_bptt: fused kernels unavailable \\({expected}") as record:
        assert not ops.load()
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ops.load()  # once per process
    rep = ops.info(load_now=False)
    assert not rep.loaded and rep.reason is not None and ("compiler" in rep.reason or "ninja" in rep.reason)


def test_load_without_build_is_no_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """info() never compiles: with nothing built it says so, and a later load() may still build."""
    monkeypatch.delenv("GIMLI_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(ops, "_state", _fresh_state())
    monkeypatch.setattr(ops, "_registered", lambda: False)
    monkeypatch.setattr(ops, "_PACKAGE_DIR", tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = ops.info()
    assert not rep.loaded and rep.reason.startswith("not built yet") and "build-kernels" in rep.reason
    assert not ops._state["tried"]


def test_a_library_for_another_torch_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GIMLI_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(ops, "_state", _fresh_state())
    monkeypatch.setattr(ops, "_registered", lambda: False)
    monkeypatch.setattr(ops, "_PACKAGE_DIR", tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    (tmp_path / ops.prebuilt_filename("1.0.0")).write_bytes(b"not a library")
    assert not ops.load(build=False)
    assert any("built for another torch" in n for n in ops.info(load_now=False).notes)


@pytest.mark.skipif(os.environ.get("GIMLI_DISABLE_KERNELS") == "1", reason="GIMLI_DISABLE_KERNELS=1")
def test_build_kernels_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fused kernels: loaded") and "devices: cpu" in out
    assert main(["build-kernels", "--info"]) == 0
    assert capsys.readouterr().out.startswith("fused kernels: loaded")
    monkeypatch.setenv("GIMLI_DISABLE_KERNELS", "1")
    assert main(["build-kernels"]) == 1
    assert "GIMLI_DISABLE_KERNELS is set: unset it" in capsys.readouterr().err


def test_python_m_build_kernels_info() -> None:
    """``python -m gimli_bptt build-kernels --info`` compiles nothing and reports."""
    child = subprocess.run([sys.executable, "-m", "gimli_bptt", "build-kernels", "--info"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("fused kernels: ") and "JIT cache: " in child.stdout
    assert "compiling" not in child.stderr


@pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja not on PATH")
def test_ninja_on_path_leaves_path_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    before = os.environ["PATH"]
    with ops._ninja_on_path(shutil.which("ninja")):
        assert shutil.which("ninja") is not None
    assert os.environ["PATH"] == before
