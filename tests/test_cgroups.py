"""cgroup limits, update, pause/resume, ps and device rules, on real containers via the CLI.

Every test reads the kernel's own files back, for whichever layout the host has: pure cgroup
v2 (/sys/fs/cgroup/cgroup.controllers exists: the container's directory is
/sys/fs/cgroup/corral/<id>) or cgroup v1 / hybrid (/sys/fs/cgroup/<controller>/corral/<id>).
The same file runs on the hybrid CI host and in the pure-v2 QEMU guest, where code runs ~25x
slower: each test makes one container and reuses it for several read-backs.
"""

import json
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.cgroup]

CG = Path("/sys/fs/cgroup")
V2 = (CG / "cgroup.controllers").exists()
M = 1 << 20
SLEEP = ("sleep", "300")
BUSY = ("sh", "-c", "while :; do echo x >> /dev/null; done")


# -- reading the container's cgroup files ----------------------------------------------------


def cgdir(cid, controller):
    """The container's directory holding `controller`'s files (default cgroupsPath)."""
    return CG / "corral" / cid if V2 else CG / controller / "corral" / cid


def all_cgdirs(cid):
    if V2:
        return [CG / "corral" / cid]
    return [p / "corral" / cid for p in CG.iterdir() if p.is_dir() and not p.is_symlink()]


def cat(cid, controller, name):
    return (cgdir(cid, controller) / name).read_text().strip()


def memory_limit(cid):
    return cat(cid, "memory", "memory.max" if V2 else "memory.limit_in_bytes")


def swap_file(cid):
    return cgdir(cid, "memory") / ("memory.swap.max" if V2 else "memory.memsw.limit_in_bytes")


def pids_max(cid):
    return cat(cid, "pids", "pids.max")


def cpu_weight(cid):
    """cpu.shares on v1, cpu.weight on v2."""
    return cat(cid, "cpu", "cpu.weight" if V2 else "cpu.shares")


def quota_period(cid):
    if V2:
        quota, period = cat(cid, "cpu", "cpu.max").split()
        return quota, period
    return cat(cid, "cpu", "cpu.cfs_quota_us"), cat(cid, "cpu", "cpu.cfs_period_us")


def runc_weight(shares):
    """cpu.shares to cpu.weight as runc converts them (ConvertCPUSharesToCgroupV2Value)."""
    return str(shares if not V2 else 1 + ((shares - 2) * 9999) // 262142)


def frozen(cid):
    if V2:
        events = dict(line.split() for line in cat(cid, "", "cgroup.events").splitlines())
        return events["frozen"] == "1"
    state = cat(cid, "freezer", "freezer.state")
    assert state in ("FROZEN", "THAWED"), state  # not stuck in FREEZING
    return state == "FROZEN"


def host_swap_accounting():
    """True when the host accounts swap per cgroup; None when it cannot tell before a cgroup
    with the memory controller exists (v2: memory.swap.max is not in the root)."""
    if not V2:
        return (CG / "memory" / "memory.memsw.limit_in_bytes").exists()
    for d in CG.iterdir():
        if d.is_dir() and (d / "memory.max").exists():
            return (d / "memory.swap.max").exists()
    return None


def v1_hierarchy_has(controller):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            right = line.partition(" - ")[2].split()
            if len(right) >= 3 and right[0] == "cgroup" and controller in right[2].split(","):
                return True
    return False


def saved_resources(rt, cid):
    data = json.loads((rt.state_root / cid / "state.json").read_text())
    return data["config"]["linux"]["resources"]


def cpu_ticks(pid):
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def runs(pid, seconds=0.3):
    before = cpu_ticks(pid)
    time.sleep(seconds)
    return cpu_ticks(pid) > before


# -- limits at create ------------------------------------------------------------------------


def test_create_applies_limits(rt, make_bundle):
    res = {"memory": {"limit": 64 * M}, "pids": {"limit": 42},
           "cpu": {"shares": 512, "quota": 20000, "period": 50000, "cpus": "0"}}
    swap = host_swap_accounting()
    if swap:
        res["memory"]["swap"] = 96 * M
    cid = rt.create(make_bundle(args=SLEEP, changes={"linux": {"resources": res}}))

    assert memory_limit(cid) == str(64 * M)
    if swap:
        # OCI swap is memory+swap: v1 memsw holds it, v2 swap.max holds swap alone.
        assert swap_file(cid).read_text().strip() == str((32 if V2 else 96) * M)
    assert pids_max(cid) == "42"
    assert cpu_weight(cid) == runc_weight(512)
    assert quota_period(cid) == ("20000", "50000")
    assert cat(cid, "cpuset", "cpuset.cpus") == "0"
    # The init is in every one of the container's cgroups.
    pid = rt.state(cid)["pid"]
    for d in all_cgdirs(cid):
        assert str(pid) in (d / "cgroup.procs").read_text().split(), d


# -- update ----------------------------------------------------------------------------------


def test_update_flags_and_resources_files(rt, make_bundle, tmp_path):
    base = {"memory": {"limit": 64 * M}, "pids": {"limit": 42}}
    b = make_bundle(args=SLEEP, changes={"linux": {"resources": base}})
    cid = rt.create(b)
    assert quota_period(cid) == ("max" if V2 else "-1", "100000")

    # Only a quota: the period stays as it is (v2 writes "Q $keep" as "Q <current period>").
    rt("update", "--cpu-quota", "25000", cid)
    assert quota_period(cid) == ("25000", "100000")

    rt("update", "--memory", "128M", "--pids-limit", "20", "--cpu-quota", "30000",
       "--cpu-period", "60000", cid)
    assert memory_limit(cid) == str(128 * M)
    assert pids_max(cid) == "20"
    assert quota_period(cid) == ("30000", "60000")

    rt("update", "--cpu-quota", "40000", cid)
    assert quota_period(cid) == ("40000", "60000")

    f1 = tmp_path / "r1.json"
    f1.write_text(json.dumps({"pids": {"limit": 30}, "memory": {"limit": 96 * M}}))
    rt("update", "--resources", f1, cid)
    assert pids_max(cid) == "30"
    assert memory_limit(cid) == str(96 * M)

    f2 = tmp_path / "r2.json"
    f2.write_text(json.dumps({"pids": {"limit": 31}, "cpu": {"shares": 256}}))
    rt("update", f"--resources={f2}", cid)
    assert pids_max(cid) == "31"
    assert cpu_weight(cid) == runc_weight(256)

    rt("update", "--resources", "-", cid,
       input=json.dumps({"pids": {"limit": 33}, "cpu": {"period": 100000}}))
    assert pids_max(cid) == "33"
    assert quota_period(cid) == ("40000", "100000")
    assert memory_limit(cid) == str(96 * M)  # untouched fields keep their values

    want_memory = {"limit": 96 * M}
    if swap_file(cid).exists():
        rt("update", "--memory", "64M", "--memory-swap", "96M", cid)
        assert memory_limit(cid) == str(64 * M)
        assert swap_file(cid).read_text().strip() == str((32 if V2 else 96) * M)
        # Raising both above the current memory+swap: v1 must raise memsw first.
        rt("update", "--memory", "256M", "--memory-swap", "512M", cid)
        assert memory_limit(cid) == str(256 * M)
        assert swap_file(cid).read_text().strip() == str((256 if V2 else 512) * M)
        want_memory = {"limit": 256 * M, "swap": 512 * M}

    # state.json keeps the merged resources (and the spec's device rules).
    saved = saved_resources(rt, cid)
    assert saved["memory"] == want_memory
    assert saved["pids"] == {"limit": 33}
    assert saved["cpu"] == {"quota": 40000, "period": 100000, "shares": 256}
    assert saved["devices"] == b.config["linux"]["resources"]["devices"]
    assert rt.status(cid) == "created"


def test_update_is_all_or_nothing(rt, make_bundle, tmp_path):
    base = {"memory": {"limit": 64 * M}, "pids": {"limit": 42}, "cpu": {"shares": 512}}
    cid = rt.create(make_bundle(args=SLEEP, changes={"linux": {"resources": base}}))

    def snapshot():
        return (memory_limit(cid), pids_max(cid), cpu_weight(cid),
                cat(cid, "cpuset", "cpuset.cpus"))

    before = snapshot()
    saved = saved_resources(rt, cid)
    assert before[:3] == (str(64 * M), "42", runc_weight(512))

    patches = [
        # refused while planning, before any write
        ({"pids": {"limit": 77}, "memory": {"limit": -5}}, "linux.resources.memory.limit"),
        ({"pids": {"limit": 77}, "memory": {"bogus": 1}}, "linux.resources.memory.bogus"),
        ({"pids": {"limit": 77}, "bogus": {}}, "linux.resources.bogus"),
        # refused by the kernel after the memory and cpu writes: those are rolled back
        ({"memory": {"limit": 128 * M}, "cpu": {"shares": 1024, "cpus": "9999"},
          "pids": {"limit": 77}}, "linux.resources.cpu.cpus"),
    ]
    for patch, field in patches:
        res = rt("update", "--resources", "-", cid, input=json.dumps(patch), check=False)
        assert res.returncode == 1, (patch, res)
        assert field in res.stderr, (patch, res.stderr)
        assert snapshot() == before, patch
        assert saved_resources(rt, cid) == saved, patch

    missing = tmp_path / "missing.json"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"pids": {"limit": 77}')
    for flags, named in ((["--resources", str(missing)], str(missing)),
                         ([f"--resources={bad_json}"], str(bad_json)),
                         (["--resources", "-", "--pids-limit", "77"], "JSON object"),
                         (["--pids-limit", "77", "--memory", "-5"], "--memory"),
                         (["--pids-limit", "77", "--memory", "lots"], "--memory"),
                         (["--pids-limit", "lots"], "--pids-limit"),
                         (["--memory", "32M", "--cpu-period", "999"], "linux.resources.cpu.period"),
                         (["--memory", "32M", "--memory-swap", "16M"],
                          "linux.resources.memory.swap")):
        res = rt("update", *flags, cid, input="[]", check=False)
        assert res.returncode == 1, (flags, res)
        assert named in res.stderr, (flags, res.stderr)
        assert snapshot() == before, flags
        assert saved_resources(rt, cid) == saved, flags


# -- a controller the host does not have -----------------------------------------------------


def test_controller_the_host_lacks(rt, make_bundle):
    if not V2 and v1_hierarchy_has("net_cls"):
        pytest.skip("this host mounts net_cls")
    parents = {p: p.exists() for p in {d.parent for d in all_cgdirs("x")}}
    b = make_bundle(args=SLEEP, changes={"linux": {"resources": {
        "pids": {"limit": 10}, "network": {"classID": 1048577}}}})
    cid = rt.new_id()
    res = rt("create", "--bundle", b.path, cid, check=False)
    assert res.returncode == 1, res
    assert "linux.resources.network" in res.stderr
    if V2:
        assert re.search(r"not supported|do(es)? not exist", res.stderr), res.stderr
        assert "v2" in res.stderr
    else:
        assert "net_cls" in res.stderr
    assert not (rt.state_root / cid).exists()
    assert rt("list", "-q").stdout == ""
    for d in all_cgdirs(cid):
        assert not d.exists(), d
    for parent, existed in parents.items():
        # A /corral made for this container is removed again (unless another container of a
        # concurrent run has just started using it).
        if not existed and parent.exists():
            assert any(p.is_dir() for p in parent.iterdir()), f"{parent} left behind"


# -- pause / resume --------------------------------------------------------------------------


def test_pause_resume(rt, make_bundle):
    if not V2 and not (CG / "freezer").is_dir():
        pytest.skip("no freezer hierarchy")
    cid = rt.create(make_bundle(args=BUSY))

    res = rt("pause", cid, check=False)
    assert res.returncode == 1
    assert cid in res.stderr
    assert "created" in res.stderr
    assert rt.status(cid) == "created"
    assert not frozen(cid)

    rt("start", cid)
    assert rt.wait_status(cid, "running") == "running"
    pid = rt.state(cid)["pid"]
    res = rt("resume", cid, check=False)
    assert res.returncode == 1
    assert "not paused" in res.stderr
    assert runs(pid)

    rt("pause", cid)
    assert rt.status(cid) == "paused"
    (entry,) = json.loads(rt("list", "--format", "json").stdout)
    assert (entry["id"], entry["status"], entry["pid"]) == (cid, "paused", pid)
    assert "paused" in rt("list").stdout.splitlines()[1].split()
    assert frozen(cid)
    assert not runs(pid)
    res = rt("pause", cid, check=False)
    assert res.returncode == 1
    assert "paused" in res.stderr
    rt("update", "--pids-limit", "50", cid)  # a paused container can be updated
    assert pids_max(cid) == "50"
    assert rt.status(cid) == "paused"

    rt("resume", cid)
    assert rt.status(cid) == "running"
    assert not frozen(cid)
    assert runs(pid)

    rt("pause", cid)
    assert rt.status(cid) == "paused"
    rt("delete", "--force", cid)
    assert rt("state", cid, check=False).returncode == 1
    for d in all_cgdirs(cid):
        assert not d.exists(), d


# -- ps --------------------------------------------------------------------------------------


def test_ps(rt, make_bundle):
    cid = rt.create(make_bundle(args=("sh", "-c", "sleep 300 & wait")))
    rt("start", cid)
    pid = rt.state(cid)["pid"]
    deadline = time.monotonic() + 10
    while True:
        pids = json.loads(rt("ps", "--format", "json", cid).stdout)
        if len(pids) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert isinstance(pids, list)
    assert all(isinstance(p, int) for p in pids)
    assert pid in pids
    assert len(pids) == 2, pids  # sh and its sleep

    lines = rt("ps", cid).stdout.splitlines()
    header = lines[0].split()
    assert "PID" in header
    col = header.index("PID")
    shown = [int(line.split()[col]) for line in lines[1:]]
    assert sorted(shown) == sorted(pids)

    lines = rt("ps", cid, "-o", "pid,comm").stdout.splitlines()
    assert lines[0].split() == ["PID", "COMMAND"]
    comm = dict(line.split() for line in lines[1:])
    assert comm.pop(str(pid)) == "sh"
    assert list(comm.values()) == ["sleep"]


# -- device rules ----------------------------------------------------------------------------

DEVICE_SCRIPT = r"""
try() { if "$@" 2>/tmp/err >/dev/null; then echo ok; else cat /tmp/err; fi; }
echo "zero: $(try head -c1 /dev/zero)"
mknod /tmp/sda b 8 0 && mknod /tmp/sdb b 8 16 && echo mknod: ok
echo "sda-read: $(try head -c1 /tmp/sda)"
echo "sdb-read: $(try head -c1 /tmp/sdb)"
echo "sda-write: $( (echo x >/tmp/sda) 2>&1 && echo ok)"
"""


def test_device_rules(rt):
    def changes(cfg):
        for caps in cfg["process"]["capabilities"].values():
            caps.append("CAP_MKNOD")
        cfg["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                              "options": ["nosuid", "mode=1777", "size=1m"]})
        # the spec's deny-all, then read access to 8:0 only
        assert cfg["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
        cfg["linux"]["resources"]["devices"].append(
            {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"})

    rc, out, err = rt.run_container(changes, args=("sh", "-c", DEVICE_SCRIPT))
    assert rc == 0, (out, err)
    got = dict(line.split(": ", 1) for line in out.splitlines())
    eperm = "Operation not permitted"
    assert got["zero"] == "ok"  # allowed by default
    assert got["mknod"] == "ok"  # b *:* m is allowed by default
    assert eperm in got["sdb-read"]  # denied: no rule allows 8:16
    # allowed read: no such disk here, so ENXIO (or ok where there is one), never EPERM
    assert eperm not in got["sda-read"], got
    assert eperm in got["sda-write"]  # only r was allowed
