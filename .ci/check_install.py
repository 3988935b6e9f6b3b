# SPDX-License-Identifier: Apache-2.0
"""Checks an installed (non-editable) gimli_bptt as a user gets it: kernels from site-packages, fused = pure, metadata.

Run by ``.ci/run`` with a fresh venv's python, from a folder outside the checkout (so the
source tree is not on ``sys.path``)::

    python /path/to/checkout/.ci/check_install.py --checkout /path/to/checkout --built-from /deleted/clone \
        --expect jit|prebuilt

``--built-from``: the clean clone the sdist and wheel were built from, deleted before this runs
(the check asserts it is gone); ``--checkout`` gives the ``pyproject.toml`` and the kernel
sources (its top-level ``csrc/``, which the build maps into the package as ``gimli_bptt/csrc/``)
to compare the installed metadata and files with.

``--expect jit``: the kernels are compiled on first use from the sources inside the installed
package; the check runs that first use in a child process with an empty ``TORCH_EXTENSIONS_DIR``
and asserts that the build is announced and that no warning is raised. ``--expect prebuilt``:
they were compiled at install (``--no-build-isolation``) and load from site-packages without
a build. Either way a hypergradient with ``kernels="fused"`` must equal the pure path's
(``kernels="reference"``) in float64, to a tolerance from the problem's conditioning, and the installed metadata must match
``pyproject.toml``. Exits non-zero, saying what is wrong, on the first failed check.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any


def check(cond: bool, what: str) -> None:
    """Raises SystemExit naming ``what`` unless ``cond``."""
    if not cond:
        raise SystemExit(f"check_install: FAILED: {what}")
    print(f"check_install: ok: {what}", flush=True)


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()]


def _inside(path: str | Path, dirs: list[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == d or d in p.parents for d in dirs)


def check_not_from_checkout(checkout: Path, built_from: Path) -> Any:
    """The package imports from site-packages: the tree it was built from is gone, no source tree is on sys.path."""
    check(not built_from.exists(), f"the clone the package was built from is deleted ({built_from})")
    sites = _site_dirs()
    trees = [p for p in sys.path if (Path(p or os.getcwd()) / "gimli_bptt").is_dir() and not _inside(p or ".", sites)]
    check(not trees, f"no source tree on sys.path ({trees or 'none'})")
    import gimli_bptt

    check(_inside(gimli_bptt.__file__, _site_dirs()), f"gimli_bptt imports from site-packages ({gimli_bptt.__file__})")
    check(not _inside(gimli_bptt.__file__, [checkout]), "gimli_bptt does not import from the checkout")
    return gimli_bptt


def check_metadata(checkout: Path, gimli_bptt: Any) -> None:
    """Name, version, Python and torch requirements, URLs, classifiers and package data, as pyproject.toml says."""
    project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
    meta = md.metadata("gimli_bptt")
    check(meta["Name"] == project["name"], f"metadata Name {meta['Name']!r}")
    check(md.version("gimli_bptt") == project["version"] == gimli_bptt.__version__,
          f"version {md.version('gimli_bptt')} = pyproject's {project['version']} = gimli_bptt.__version__ "
          f"{gimli_bptt.__version__}")
    check(meta["Requires-Python"] == project["requires-python"], f"Requires-Python {meta['Requires-Python']}")
    torch_reqs = [r for r in md.requires("gimli_bptt") or [] if re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] == "torch"]
    check([r.replace(" ", "") for r in torch_reqs] == ["torch>=2.13"], f"Requires-Dist on torch is {torch_reqs}")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    check(set(project.get("urls", {})) <= set(urls), f"Project-URL {sorted(urls)}")
    classifiers = meta.get_all("Classifier") or []
    check(classifiers == project["classifiers"], f"{len(classifiers)} classifiers")
    extras = set(meta.get_all("Provides-Extra") or [])
    check(set(project["optional-dependencies"]) <= extras, f"extras {sorted(extras)}")
    # The sources are tracked once, in the checkout's top-level csrc/; the build maps them into the
    # package (setup.py's build_py), so the installed package carries each as gimli_bptt/csrc/<path>.
    files = {str(f) for f in md.files("gimli_bptt") or []}
    shipped = {f"gimli_bptt/csrc/{p.relative_to(checkout / 'csrc').as_posix()}"
               for p in (checkout / "csrc").rglob("*") if p.is_file()}
    check(bool(shipped) and shipped <= files,
          f"the {len(shipped)} kernel sources of the checkout's csrc/ are installed as gimli_bptt/csrc/")
    site_csrc = Path(gimli_bptt.__file__).resolve().parent / "csrc"
    same = all((site_csrc / p.relative_to(checkout / "csrc")).read_bytes() == p.read_bytes()
               for p in (checkout / "csrc").rglob("*") if p.is_file())
    check(same, f"the installed sources ({site_csrc}) are byte for byte the checkout's csrc/")
    entry = [e for e in md.entry_points(group="console_scripts") if e.name == "gimli-bptt"]
    check(len(entry) == 1 and entry[0].value == "gimli_bptt.__main__:main", "console script gimli-bptt")


def check_first_use_builds(expect: str) -> None:
    """--expect jit: a first use in a child with an empty extension cache compiles, announced, without a warning."""
    with tempfile.TemporaryDirectory(prefix="gimli_ext_") as cache:
        os.environ["TORCH_EXTENSIONS_DIR"] = cache
        code = ("import warnings; warnings.filterwarnings('error', message='.*gimli_bptt')\n"
                "from gimli_bptt import kernels\n"
                "assert kernels.is_available('cpu'), kernels.info()\n"
                "print(kernels.info().source)\n")
        t0 = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - t0
        sys.stderr.write(child.stderr)
        check(child.returncode == 0, f"the first use loads the kernels without a warning (rc {child.returncode})")
        check(child.stdout.split()[-1:] == [expect], f"they come from the {expect} build ({child.stdout.strip()})")
        if expect == "jit":
            check("gimli_bptt: compiling the fused optimizer kernels once for torch" in child.stderr
                  and "gimli_bptt: fused optimizer kernels compiled in" in child.stderr,
                  f"the build is announced on stderr, start and end ({seconds:.0f} s)")
        else:
            check("compiling" not in child.stderr, "nothing is compiled on first use")
        # The rest of the checks reuse this cache (no second build).
        check_kernels_and_hypergradients(expect, cache)


def check_kernels_and_hypergradients(expect: str, cache: str) -> None:
    """Kernels load from the installed package; fused and pure hypergradients agree (float64) to a tolerance
    derived from the problem's conditioning."""
    import torch
    from torch import nn

    from gimli_bptt import GimliUpdater, kernels
    from gimli_bptt.testing import float64_rtol

    # The rounding of these two J = 4 hypergradients grows 1.6x (SGD) and 4.9x (Adam), measured with
    # gimli_bptt.testing.hypergradient_amplification on this very problem (float32 against float64); rounded up
    # to 1e2 with room for the per-entry normalisation below: 16 * 1e2 * eps64 = 3.6e-13 of the largest entry.
    tol = float64_rtol(terms=1, condition=1e2)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gimli_bptt")
        check(kernels.is_available("cpu"), "CPU kernels available, without a warning")
    info = kernels.info()
    print(info, flush=True)
    sites = _site_dirs()
    check(info.source == expect, f"loaded from the {expect} build")
    check(_inside(info.sources, sites), f"kernel sources in site-packages ({info.sources})")
    where = sites if expect == "prebuilt" else [Path(cache).resolve()]
    check(info.library is not None and _inside(info.library, where), f"library {info.library}")
    check("cpu" in info.devices, f"devices {info.devices}")

    def hypergrads(kernel_impl: str, optimizer: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
        opt = (torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
               else torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-3))
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
                   for _ in range(5)]
        loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
        up = GimliUpdater(model, opt, loss, loss, unroll=4, kernels=kernel_impl,
                          learn={"lr": "group", "weight_decay": "tensor"})
        result = up.hypergradient(batches[:4], batches[4])
        out = {"val_loss": torch.as_tensor(result.val_loss, dtype=torch.float64).detach().reshape(1)}
        for k, v in result.hypergrads.items():
            out[k] = torch.cat([t.reshape(-1) for t in v]) if isinstance(v, (list, tuple)) else v.reshape(-1)
        return out

    for optimizer in ("sgd", "adam"):
        fused, pure = hypergrads("fused", optimizer), hypergrads("reference", optimizer)
        check(fused.keys() == pure.keys(), f"{optimizer}: the same hypergradients ({sorted(fused)})")
        # relative to each hypergradient's largest entry (an entry near zero has no relative error of its own)
        worst = max(((fused[k] - pure[k]).abs().max() / pure[k].abs().max().clamp_min(1e-300)).item() for k in fused)
        bitwise = all(torch.equal(fused[k], pure[k]) for k in fused)
        check(worst <= tol, f"{optimizer}: fused = pure to {'the bit' if bitwise else f'{worst:.1e} relative'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, required=True, help="the source checkout (for pyproject.toml)")
    p.add_argument("--built-from", type=Path, required=True, help="the deleted clone the package was built from")
    p.add_argument("--expect", choices=["jit", "prebuilt"], required=True,
                   help="where the kernels must come from: compiled on first use, or at install")
    a = p.parse_args()
    checkout = a.checkout.resolve()
    gimli_bptt = check_not_from_checkout(checkout, a.built_from.resolve())
    check_metadata(checkout, gimli_bptt)
    check_first_use_builds(a.expect)
    print("check_install: every check passed", flush=True)


if __name__ == "__main__":
    main()
