"""Where corral puts a container's cgroups, on whichever cgroup layout this machine has.

Marked `cgroup`: scripts/test runs these twice, on the host (hybrid here: v1 controllers under
/sys/fs/cgroup/<ctrl> plus a cgroup2 at /sys/fs/cgroup/unified) and in a guest whose only
cgroup filesystem is cgroup2 at /sys/fs/cgroup (scripts/run-in-v2-guest). Each test asserts
the facts of the layout it finds; in the guest (CORRAL_V2_GUEST=1) that layout must be v2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cgroup, pytest.mark.root]

CG = Path("/sys/fs/cgroup")
SLEEP = ("sleep", "600")


def _fstypes() -> dict[str, str]:
    """Mount point -> filesystem type (the topmost mount where several share a point)."""
    types: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            types[left.split()[4]] = right.split()[0]
    return types


def cgroup_layout() -> str:
    """'v2' (cgroup2 at /sys/fs/cgroup), 'hybrid' (v1 plus cgroup2 at unified/), 'v1', or
    'unknown' (no cgroup2 at /sys/fs/cgroup and no v1 memory hierarchy)."""
    types = _fstypes()
    if types.get(str(CG)) == "cgroup2":
        return "v2"
    if types.get(str(CG / "memory")) != "cgroup":
        return "unknown"
    return "hybrid" if types.get(str(CG / "unified")) == "cgroup2" else "v1"


LAYOUT = cgroup_layout()


def container_dirs(rel: str) -> list[Path]:
    """The directories that must hold a container placed at cgroup path `rel` (no leading /).

    v2: one directory in the unified tree. v1: one per hierarchy (memory is checked as the
    representative); hybrid adds the directory in the cgroup2 tree at unified/.
    """
    if LAYOUT == "v2":
        return [CG / rel]
    dirs = [CG / "memory" / rel]
    if LAYOUT == "hybrid":
        dirs.append(CG / "unified" / rel)
    return dirs


def procs(d: Path) -> list[int]:
    return [int(p) for p in (d / "cgroup.procs").read_text().split()]


def test_layout_is_the_expected_one():
    if os.environ.get("CORRAL_V2_GUEST") == "1":
        assert LAYOUT == "v2", "scripts/run-in-v2-guest must give a pure cgroup v2 machine"
        assert [p for p, t in _fstypes().items() if t == "cgroup"] == [], "v1 mounted in guest"
    assert LAYOUT in ("v2", "hybrid", "v1"), f"cgroup mounts: {_fstypes()}"


def test_run_puts_the_container_in_its_cgroup(rt):
    rc, out, err = rt.run_container(args=("cat", "/proc/self/cgroup"))
    cid = rt.ids[-1]
    assert rc == 0, err
    lines = out.split()
    if LAYOUT == "v2":
        # One line, the unified hierarchy (no cgroup namespace in the default spec).
        assert lines == [f"0::/corral/{cid}"]
    else:
        assert any(line.endswith(f":memory:/corral/{cid}") for line in lines), out
        if LAYOUT == "hybrid":
            assert f"0::/corral/{cid}" in lines
    # `run` deletes the container when it exits, and its cgroups with it.
    for d in container_dirs(f"corral/{cid}"):
        assert not d.exists(), f"{d} left after run"


def test_detached_container_cgroup_and_delete(rt, make_bundle):
    b = make_bundle(args=SLEEP)
    cid = rt.new_id()
    rt("run", "--detach", "--bundle", b.path, cid)
    assert rt.wait_status(cid, "running") == "running"
    pid = rt.state(cid)["pid"]
    assert pid > 0

    dirs = container_dirs(f"corral/{cid}")
    for d in dirs:
        assert d.is_dir(), f"no cgroup {d}"
        assert procs(d) == [pid], f"{d}/cgroup.procs should hold only the init {pid}"

    if LAYOUT == "v2":
        # Controllers are delegated down to the container: enabled at the root and at corral/.
        for level in (CG, CG / "corral"):
            enabled = (level / "cgroup.subtree_control").read_text().split()
            assert {"memory", "pids"} <= set(enabled), f"{level}: {enabled}"
        assert (dirs[0] / "memory.max").is_file()
        assert (dirs[0] / "pids.max").is_file()
        assert Path(f"/proc/{pid}/cgroup").read_text() == f"0::/corral/{cid}\n"
    else:
        assert (dirs[0] / "memory.limit_in_bytes").is_file()
        assert f":memory:/corral/{cid}\n" in Path(f"/proc/{pid}/cgroup").read_text()

    rt("kill", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)
    for d in dirs:
        assert not d.exists(), f"{d} left after delete"
    assert rt.leftovers() == []


@pytest.mark.parametrize(
    "where",
    [
        "corral/{id}",
        "{id}",
    ],
)
def test_leftover_detection_sees_cgroups(rt, where):
    """The fixtures' leftover check must find a stray cgroup named after a test's id."""
    cid = rt.new_id()
    dirs = container_dirs(where.format(id=cid))
    made: list[Path] = []
    try:
        for d in dirs:
            for p in reversed([d, *d.parents]):
                if not p.exists():
                    p.mkdir()
                    made.append(p)
        problems = rt.leftovers()
        for d in dirs:
            assert any(str(d) in p for p in problems), f"{d} not reported: {problems}"
    finally:
        for p in reversed(made):
            p.rmdir()
