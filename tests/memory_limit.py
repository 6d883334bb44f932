"""Running a command under a hard memory limit: a cgroup of its own (v2, or v1's memory controller), as a container
with that much memory would run it. The kernel counts what the command allocates and the page cache it reads into;
past the limit it reclaims the cache and, when nothing is left to reclaim, kills the command."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")


def _root() -> tuple[Path, str, str] | None:
    """(where groups are made, the limit file, the peak file) of the cgroup tree with a memory controller, or None."""
    if (V2_ROOT / "cgroup.controllers").exists() and "memory" in (V2_ROOT / "cgroup.subtree_control").read_text():
        return V2_ROOT, "memory.max", "memory.peak"
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return V1_ROOT, "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    return None


def limits_available() -> bool:
    """Whether a memory-limited group can be made here (root, or a delegated cgroup)."""
    found = _root()
    if found is None:
        return False
    probe = found[0] / f"retrofit-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


def run_limited(argv: list[str], limit_bytes: int, **kwargs) -> tuple[subprocess.CompletedProcess, int]:
    """Run `argv` in a new cgroup limited to `limit_bytes` (swap is off on the test machines, so the limit is the
    memory); returns the finished process and the group's peak usage in bytes."""
    found = _root()
    assert found is not None, "no cgroup memory controller; check limits_available() first"
    root, limit_file, peak_file = found
    group = root / f"retrofit-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(limit_bytes))
        procs = group / "cgroup.procs"

        def join() -> None:  # in the child, before exec: everything the command does is counted
            procs.write_text(str(os.getpid()))

        result = subprocess.run(argv, preexec_fn=join, capture_output=True, text=True, **kwargs)
        return result, int((group / peak_file).read_text().split()[0])
    finally:
        group.rmdir()
