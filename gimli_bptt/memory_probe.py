# SPDX-License-Identifier: Apache-2.0
"""How much memory is available now, on the parameters' device: what ``memory="auto"`` plans in.

On CUDA the driver's free memory plus what PyTorch's caching allocator holds but does not use;
on MPS the recommended maximum less what the driver holds; on the CPU the kernel's
``MemAvailable`` from ``/proc/meminfo``, or less when a cgroup (a container's limit) leaves
less (Note [The automatic budget] in :mod:`gimli_bptt.memory`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

# Note [Reading the available memory cheaply]: memory="auto" reads /proc/meminfo and the
# cgroup's limit and usage at the start of every meta step. Opening three files costs about
# 0.3 ms on a 2-core machine, a tenth of a small problem's meta step, so each file is opened once
# per process and re-read in place with ``os.pread`` at offset 0 (procfs and cgroupfs files
# regenerate their contents on every read from the start, so the numbers are current). A file
# there that cannot be opened is remembered as absent; after a ``fork`` the child shares the
# descriptors, which ``pread`` (no shared file offset) reads safely. Paths elsewhere (tests'
# stand-ins) are opened and read at every call.
_FDS: dict[str, Optional[int]] = {}


def _read_text(path: str) -> Optional[str]:
    """The current contents of a small procfs/sysfs file (Note [Reading the available memory cheaply])."""
    if not path.startswith(("/proc/", "/sys/")):  # an ordinary file (tests): read it afresh
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            return None
    fd = _FDS.get(path, -1)
    if fd == -1:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = None
        _FDS[path] = fd
    if fd is None:
        return None
    try:
        chunks, offset = [], 0
        while True:
            chunk = os.pread(fd, 65536, offset)
            chunks.append(chunk)
            offset += len(chunk)
            if len(chunk) < 65536:
                break
        return b"".join(chunks).decode("ascii", "replace")
    except OSError:  # the file went away (or never allowed pread): read it the ordinary way
        _FDS.pop(path, None)
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            return None


def _read_int(path: str) -> Optional[int]:
    text = _read_text(path)
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None


#: Where the CPU's available memory is read: the kernel's estimate, then cgroup v2 and v1 limits.
MEMINFO = "/proc/meminfo"
CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cpu_available(meminfo: str = MEMINFO, cgroups: Sequence[tuple[str, str]] = CGROUP_LIMITS) -> tuple[int, str]:
    """The bytes this process may still allocate on the CPU, and where the number comes from."""
    available, source = None, ""
    text = _read_text(meminfo)
    if text is not None:
        at = text.find("MemAvailable:")
        if at >= 0:
            fields = text[at:].split(None, 2)
            if len(fields) >= 2 and fields[1].isdigit():
                available, source = int(fields[1]) * 1024, "MemAvailable"
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "free pages"
        except (ValueError, OSError, AttributeError):
            available, source = 0, "unknown"
    for limit_path, usage_path in cgroups:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit - usage < available:
            available, source = max(limit - usage, 0), "the cgroup's memory limit"
    return available, source


def available_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes available now on device, what was read)`` (Note [The automatic budget] in :mod:`gimli_bptt.memory`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0)), f"cuda:{device.index or 0} free + cached"
    if device.type == "mps" and hasattr(torch, "mps"):
        total = int(torch.mps.recommended_max_memory())
        return max(total - int(torch.mps.driver_allocated_memory()), 0), "mps recommended maximum"
    return _cpu_available()


__all__ = ["CGROUP_LIMITS", "MEMINFO", "available_memory"]
