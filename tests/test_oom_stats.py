"""Stats, the OOM watcher and `events`: fake cgroup trees for the logic, real containers for
the kernel's side (root tests: a memory limit written by hand after `create`, before `start`).

The root tests are also marked `cgroup`, so that scripts/run-in-v2-guest runs them on a pure
cgroup v2 kernel too (they pass there: inotify on memory.events, memory.events.local levels).
"""

import json
import os
import select
import threading
import time
from pathlib import Path

import pytest
from corral.runtime import _oom
from corral.runtime._errors import CorralError
from corral.runtime._events import events, parse_duration
from corral.runtime._oom import OomKill, OomWatcher
from corral.runtime._state import Root
from corral.runtime._stats import MAX_UINT64, controller_dir, stats

LIMIT = 32 << 20
# One process that touches 64 MiB at once: well over the limit, and the init itself, so the
# container stops when it is killed.
OOM_ARGS = ("dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
EVENTS_V2 = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"


def write_files(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def readable(fd: int, timeout: float = 1.0) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


# -- parse_duration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("100ms", 0.1), ("1m30s", 90.0), ("1.5h", 5400.0), ("250us", 0.00025),
     ("250\u00b5s", 0.00025), ("10ns", 1e-8), ("0", 0.0), ("-2s", -2.0), ("+3m", 180.0),
     (".5s", 0.5), ("1h2m3.5s", 3723.5)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5x", "1.5", "--1s", "5 s", ".s", "9999999999h"])
def test_parse_duration_rejects(text):
    with pytest.raises(CorralError) as exc:
        parse_duration(text)
    assert repr(text) in str(exc.value)


# -- controller_dir and stats on fake trees --------------------------------------------------


def test_controller_dir_finds_comounted_and_v2():
    cg = {"version": 1, "paths": {"cpu,cpuacct": "/x/cpu", "memory": "/x/mem",
                                  "name=systemd": "/x/sd"}}
    assert controller_dir(cg, "cpuacct") == "/x/cpu"
    assert controller_dir(cg, "cpu") == "/x/cpu"
    assert controller_dir(cg, "name=systemd") == "/x/sd"
    assert controller_dir(cg, "pids") is None
    assert controller_dir({"version": 2, "path": "/y"}, "memory") == "/y"
    assert controller_dir({}, "memory") is None


def test_stats_of_nothing_is_runcs_zero_object(tmp_path):
    empty = stats({})
    assert empty["cpu"] == {"usage": {"kernel": 0, "user": 0}, "throttling": {}}
    assert empty["memory"]["usage"] == {"limit": 0, "failcnt": 0}
    assert empty["pids"] == {}
    assert empty["blkio"] == {}
    assert empty["hugetlb"] == {}
    # Missing directories and files are skipped, never an error.
    gone = str(tmp_path / "gone")
    assert stats({"version": 1, "paths": {"memory": gone, "cpuacct": gone, "pids": gone},
                  "mounts": {}})["memory"]["usage"] == {"limit": 0, "failcnt": 0}
    assert stats({"version": 2, "path": gone})["pids"] == {}


def test_stats_v1(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    cpu = write_files(tmp_path / "cpu,cpuacct", {
        "cpuacct.usage": "3000\n", "cpuacct.usage_percpu": "1000 2000 \n",
        "cpuacct.usage_all": "cpu user system\n0 600 400\n1 1500 500\n",
        "cpuacct.stat": f"user {2 * hz}\nsystem {hz}\n",
        "cpu.stat": "nr_periods 7\nnr_throttled 2\nthrottled_time 900\n"})
    mem = write_files(tmp_path / "memory", {
        "memory.stat": "cache 4096\nrss 8192\ntotal_rss 8192\n",
        "memory.usage_in_bytes": "12288\n", "memory.max_usage_in_bytes": "20000\n",
        "memory.limit_in_bytes": "33554432\n", "memory.failcnt": "3\n",
        "memory.memsw.usage_in_bytes": "12288\n", "memory.memsw.max_usage_in_bytes": "0\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n", "memory.memsw.failcnt": "0\n"})
    pids = write_files(tmp_path / "pids", {"pids.current": "4\n", "pids.max": "max\n"})
    blkio = write_files(tmp_path / "blkio", {
        "blkio.throttle.io_service_bytes_recursive":
            "8:0 Read 100\n8:0 Write 200\n8:0 Total 300\nTotal 300\n",
        "blkio.throttle.io_serviced_recursive": "8:0 Read 1\n8:0 Write 0\nTotal 1\n"})
    huge = write_files(tmp_path / "hugetlb", {
        "hugetlb.2MB.usage_in_bytes": "2097152\n", "hugetlb.2MB.max_usage_in_bytes": "0\n",
        "hugetlb.2MB.failcnt": "1\n", "hugetlb.2MB.limit_in_bytes": "0\n"})
    cg = {"version": 1, "paths": {"cpu,cpuacct": str(cpu), "memory": str(mem),
                                  "pids": str(pids), "blkio": str(blkio), "hugetlb": str(huge)},
          "mounts": {}}
    s = stats(cg)
    assert s["cpu"] == {
        "usage": {"kernel": 1_000_000_000, "user": 2_000_000_000, "total": 3000,
                  "percpu": [1000, 2000], "percpu_kernel": [400, 500], "percpu_user": [600, 1500]},
        "throttling": {"periods": 7, "throttledPeriods": 2, "throttledTime": 900}}
    m = s["memory"]
    assert m["cache"] == 4096
    assert m["usage"] == {"limit": LIMIT, "usage": 12288, "max": 20000, "failcnt": 3}
    assert m["swap"] == {"limit": 9223372036854771712, "usage": 12288, "failcnt": 0}
    assert m["kernel"] == {"limit": 0, "failcnt": 0}  # no kmem files: zero, not an error
    assert m["raw"] == {"cache": 4096, "rss": 8192, "total_rss": 8192}
    assert s["pids"] == {"current": 4}  # runc: an unlimited pids.max is 0, hence left out
    assert s["blkio"] == {
        "ioServiceBytesRecursive": [
            {"major": 8, "op": "Read", "value": 100}, {"major": 8, "op": "Write", "value": 200},
            {"major": 8, "op": "Total", "value": 300}],
        "ioServicedRecursive": [{"major": 8, "op": "Read", "value": 1},
                                {"major": 8, "op": "Write"}]}
    assert s["hugetlb"] == {"2MB": {"usage": 2097152, "failcnt": 1}}
    json.dumps(s)  # plain data


def test_stats_v2(tmp_path):
    d = write_files(tmp_path / "c", {
        "cpu.stat": "usage_usec 50\nuser_usec 30\nsystem_usec 20\nnr_periods 0\n"
                    "nr_throttled 0\nthrottled_usec 0\n",
        "memory.current": "1000\n", "memory.max": "max\n", "memory.peak": "4000\n",
        "memory.events": EVENTS_V2.format(max=2, oom=0, kill=0),
        "memory.stat": "anon 600\nfile 400\n",
        "memory.swap.current": "10\n", "memory.swap.max": "100\n",
        "pids.current": "3\n", "pids.max": "64\n",
        "io.stat": "8:16 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        "hugetlb.1GB.current": "0\n", "hugetlb.1GB.max": "max\n",
        "hugetlb.1GB.events": "max 0\n"})
    s = stats({"version": 2, "path": str(d), "created": []})
    assert s["cpu"]["usage"] == {"kernel": 20_000, "user": 30_000, "total": 50_000}
    assert s["cpu"]["throttling"] == {}
    m = s["memory"]
    assert m["usage"] == {"limit": MAX_UINT64, "usage": 1000, "max": 4000, "failcnt": 2}
    # v1 compatibility: swap is reported as memory + swap; an unlimited memory.max stays max.
    assert m["swap"] == {"limit": MAX_UINT64, "usage": 1010, "failcnt": 0}
    assert m["cache"] == 400
    assert m["raw"] == {"anon": 600, "file": 400}
    assert s["pids"] == {"current": 3, "limit": 64}
    assert s["blkio"] == {
        "ioServiceBytesRecursive": [{"major": 8, "minor": 16, "op": "Read", "value": 10},
                                    {"major": 8, "minor": 16, "op": "Write", "value": 20}],
        "ioServicedRecursive": [{"major": 8, "minor": 16, "op": "Read", "value": 1},
                                {"major": 8, "minor": 16, "op": "Write", "value": 2}]}
    assert s["hugetlb"] == {"1GB": {"failcnt": 0}}


def test_stats_v2_pids_without_the_controller(tmp_path):
    d = write_files(tmp_path / "c", {"cgroup.procs": "10\n11\n12\n"})
    assert stats({"version": 2, "path": str(d)})["pids"] == {"current": 3}


# -- OomWatcher on fake trees ----------------------------------------------------------------


@pytest.fixture
def fake_v2(tmp_path):
    """parent/container, each with the v2 memory.events files (and .local for the parent)."""
    parent = write_files(tmp_path / "parent", {
        "memory.events": EVENTS_V2.format(max=0, oom=0, kill=0),
        "memory.events.local": EVENTS_V2.format(max=0, oom=0, kill=0)})
    c = write_files(parent / "c", {"memory.events": EVENTS_V2.format(max=0, oom=4, kill=5)})
    return parent, c


def test_v2_reports_the_delta_once_with_the_level(fake_v2):
    parent, c = fake_v2
    ev = c / "memory.events"
    with OomWatcher({"version": 2, "path": str(c)}) as w:
        assert w.check() == []  # 5 kills from before the watcher: not reported
        ev.write_text(EVENTS_V2.format(max=1, oom=5, kill=5))  # limit hit, kill to follow
        assert readable(w.fileno())
        assert w.check() == []
        assert w.recheck_in() is not None
        ev.write_text(EVENTS_V2.format(max=1, oom=5, kill=6))
        assert readable(w.fileno())
        assert w.check() == [OomKill(1, "container")]
        assert w.recheck_in() is None
        assert not readable(w.fileno(), 0)  # drained
        ev.write_text(EVENTS_V2.format(max=9, oom=5, kill=6))  # unrelated change later
        assert w.check() == []

        # The parent's own limit: its .local `oom` grows, the container's does not.
        (parent / "memory.events.local").write_text(EVENTS_V2.format(max=0, oom=1, kill=0))
        (parent / "memory.events").write_text(EVENTS_V2.format(max=0, oom=7, kill=8))
        ev.write_text(EVENTS_V2.format(max=9, oom=5, kill=8))
        assert w.check() == [OomKill(2, str(parent))]

        # Only a sibling's limit fired (the parent's hierarchical count, not its .local):
        # a kill here then has no limit of ours to blame.
        (parent / "memory.events").write_text(EVENTS_V2.format(max=0, oom=9, kill=9))
        ev.write_text(EVENTS_V2.format(max=9, oom=5, kill=9))
        assert w.check() == [OomKill(1, "system")]
        assert w.final_check() == []
    assert w.fileno() == -1
    assert w.check() == []


def test_v2_stale_limit_hit_is_not_blamed_later(fake_v2, monkeypatch):
    _, c = fake_v2
    ev = c / "memory.events"
    with OomWatcher({"version": 2, "path": str(c)}) as w:
        ev.write_text(EVENTS_V2.format(max=1, oom=5, kill=5))  # an OOM that killed nothing
        assert w.check() == []
        monkeypatch.setattr(_oom, "PENDING_GRACE", 0.0)
        assert w.check() == []  # the grace is over: baselines move on
        assert w.recheck_in() is None
        ev.write_text(EVENTS_V2.format(max=1, oom=5, kill=6))
        assert w.check() == [OomKill(1, "system")]


def test_v2_cgroup_gone_is_quiet(fake_v2):
    _, c = fake_v2
    w = OomWatcher({"version": 2, "path": str(c)})
    (c / "memory.events").unlink()
    assert w.check() == []
    assert w.final_check() == []
    w.close()
    w.close()


def test_watcher_needs_a_memory_cgroup(tmp_path):
    with pytest.raises(CorralError, match="memory cgroup"):
        OomWatcher({"version": 1, "paths": {"pids": str(tmp_path)}, "mounts": {}})
    with pytest.raises(CorralError, match="memory cgroup"):
        OomWatcher({"version": 2, "path": str(tmp_path / "nope")})


def _fake_v1(tmp_path, control="oom_kill_disable 0\nunder_oom 0\noom_kill {kill}\n"):
    files = {"memory.oom_control": control.format(kill=0), "cgroup.event_control": ""}
    root = write_files(tmp_path / "memory", files)
    parent = write_files(root / "parent", files)
    c = write_files(parent / "c", files)
    cg = {"version": 1, "paths": {"memory": str(c)}, "mounts": {"memory": str(root)}}
    return cg, parent, c


def test_v1_levels_from_the_notifications(tmp_path):
    cg, parent, c = _fake_v1(tmp_path)
    control = c / "memory.oom_control"
    with OomWatcher(cg) as w:
        ancestor_fds = w._level_fds
        assert len(ancestor_fds) == 1  # the parent; the hierarchy's root is never a level
        # The container's own limit: only its fd is signalled, before the kill.
        os.eventfd_write(w.fileno(), 1)
        assert w.check() == []
        # Soon after the notification (the kill usually follows within a millisecond),
        # never later than RECHECK.
        assert 0 < w.recheck_in() <= _oom.RECHECK
        control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
        assert w.check() == [OomKill(1, "container")]
        # The parent's limit: the kernel signals the parent and everything below it.
        os.eventfd_write(ancestor_fds[0], 1)
        os.eventfd_write(w.fileno(), 1)
        control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
        assert w.check() == [OomKill(2, str(parent))]
        # A system-wide OOM: no notification at all.
        control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
        assert w.check() == [OomKill(1, "system")]
        assert w.check() == []


def test_v1_kernel_without_oom_kill_counts_notifications(tmp_path):
    cg, _, _ = _fake_v1(tmp_path, control="oom_kill_disable 0\nunder_oom 0\n")
    with OomWatcher(cg) as w:
        assert w.check() == []
        os.eventfd_write(w.fileno(), 1)
        assert w.check() == [OomKill(1, "container")]


def test_oomkill_is_a_frozen_value():
    k = OomKill(2, "container")
    with pytest.raises(AttributeError):
        k.count = 3
    assert k == OomKill(2, "container")
    assert k != OomKill(1, "container")
    assert hash(k) == hash(OomKill(2, "container"))
    assert k.to_json() == {"count": 2, "level": "container"}
    assert "count=2" in repr(k)


def test_events_unknown_container(tmp_path):
    with pytest.raises(CorralError, match="nope"):
        events(Root(str(tmp_path)), "nope", stats_only=True, interval=5.0, write=print)


# -- real containers -------------------------------------------------------------------------


def saved_cgroup(rt, cid):
    return json.loads((rt.state_root / cid / "state.json").read_text())["cgroup"]


def limit_memory(d, nbytes=LIMIT):
    """Set a memory limit by hand (the runtime does not apply linux.resources yet)."""
    if os.path.exists(os.path.join(d, "memory.max")):  # v2
        Path(d, "memory.max").write_text(str(nbytes))
        if os.path.exists(os.path.join(d, "memory.swap.max")):
            Path(d, "memory.swap.max").write_text("0")
        return
    Path(d, "memory.limit_in_bytes").write_text(str(nbytes))
    # Without swap accounting capped too, swap could absorb the excess instead of an OOM.
    if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
        Path(d, "memory.memsw.limit_in_bytes").write_text(str(nbytes))


def watch_until_stopped(rt, cid, w, timeout=10.0):
    """Drive an OomWatcher like a supervisor would, until the container stops."""
    got = []
    p = select.poll()
    p.register(w.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        again = w.recheck_in()
        p.poll(100 if again is None else again * 1000)
        got += w.check()
        if rt.status(cid) == "stopped":
            break
    got += w.final_check()
    return got


@pytest.mark.root
@pytest.mark.cgroup
def test_oom_kill_is_reported_once_at_container_level(rt, make_bundle):
    cid = rt.create(make_bundle(args=OOM_ARGS))
    cg = saved_cgroup(rt, cid)
    limit_memory(controller_dir(cg, "memory"))
    with OomWatcher(cg) as w:
        rt("start", cid)
        kills = watch_until_stopped(rt, cid, w)
        assert kills == [OomKill(1, "container")]
        assert w.check() == []

        # Another container ends by SIGKILL, as an OOM victim would, but no limit fired:
        # neither its own watcher nor the first one may call it an OOM.
        b = make_bundle(args=("sleep", "30"))
        other = rt.create(b)
        ocg = saved_cgroup(rt, other)
        limit_memory(controller_dir(ocg, "memory"))
        with OomWatcher(ocg) as w2:
            rt("start", other)
            rt("kill", other, "KILL")
            assert watch_until_stopped(rt, other, w2) == []
        assert w.final_check() == []
    with pytest.raises(CorralError, match="not running"):
        events(Root(str(rt.state_root)), cid, stats_only=True, interval=5.0, write=print)


@pytest.mark.root
@pytest.mark.cgroup
def test_oom_level_names_the_ancestor_whose_limit_fired(rt, make_bundle):
    cid = rt.new_id()
    b = make_bundle(args=OOM_ARGS, changes={"linux": {"cgroupsPath": f"/{cid}-parent/{cid}"}})
    rt.create(b, cid=cid)
    cg = saved_cgroup(rt, cid)
    parent = os.path.dirname(controller_dir(cg, "memory"))
    limit_memory(parent)
    with OomWatcher(cg) as w:
        rt("start", cid)
        assert watch_until_stopped(rt, cid, w) == [OomKill(1, parent)]


@pytest.mark.root
@pytest.mark.cgroup
def test_stats_and_events_of_a_running_container(rt, make_bundle):
    cid = rt.create(make_bundle(args=("sleep", "30")))
    rt("start", cid)
    s = stats(saved_cgroup(rt, cid))
    assert s["memory"]["usage"]["usage"] > 0
    assert s["pids"]["current"] >= 1
    assert s["cpu"]["usage"]["total"] > 0

    lines = []
    assert events(Root(str(rt.state_root)), cid, stats_only=True, interval=5.0,
                  write=lines.append) == 0
    assert len(lines) == 1
    assert lines[0].endswith("\n")
    ev = json.loads(lines[0])
    assert ev["type"] == "stats"
    assert ev["id"] == cid
    assert ev["data"]["pids"]["current"] >= 1
    assert {"cpu", "memory", "pids", "blkio", "hugetlb"} <= set(ev["data"])
    rt("kill", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"


@pytest.mark.root
@pytest.mark.cgroup
def test_events_stream_reports_the_oom_and_ends_with_the_container(rt, make_bundle):
    cid = rt.create(make_bundle(args=OOM_ARGS))
    limit_memory(controller_dir(saved_cgroup(rt, cid), "memory"))
    lines: list[str] = []
    result: list[int] = []

    def run():
        result.append(events(Root(str(rt.state_root)), cid, stats_only=False, interval=0.2,
                             write=lines.append))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not lines and time.monotonic() < deadline:  # the loop runs: the watcher is set up
        time.sleep(0.02)
    assert lines, "no stats event within 5 s"
    rt("start", cid)
    t.join(10)
    assert not t.is_alive(), "events did not end when the container stopped"
    assert result == [0]
    parsed = [json.loads(line) for line in lines]
    assert [e for e in parsed if e["type"] == "oom"] == [
        {"type": "oom", "id": cid, "data": {"count": 1, "level": "container"}}]
    assert all(e["type"] in ("stats", "oom") and e["id"] == cid for e in parsed)
