"""Resource statistics of one container, in the shape `runc events --stats` prints.

Why runc's shape: containerd (go-runc) decodes the `data` object of a stats event into its
own copy of runc's `types.Stats`, so the JSON names and nesting must be runc's (those of
runc's `types/events.go`, not the different names of libcontainer's internal Stats). As with
Go's encoding/json in runc 1.1, the nested objects are always present, and a field tagged
`omitempty` there is left out when it is zero or empty; the fields runc always prints
(`kernel`, `user`, `limit`, `failcnt`, the cpuset flags) are always printed here too.

Where the values come from (the same files runc reads, with the same unit conversions):
  v1  cpuacct.usage, cpuacct.usage_percpu, cpuacct.usage_all, cpuacct.stat (ticks -> ns),
      cpu.stat, cpuset.*, memory.{,memsw.,kmem.,kmem.tcp.}{usage_in_bytes,max_usage_in_bytes,
      failcnt,limit_in_bytes}, memory.stat, pids.current/max, blkio.* (bfq, cfq, then the
      throttle files, whichever group is present first), hugetlb.<size>.*
  v2  cpu.stat (usec -> ns), memory.current/max/peak/events/stat, memory.swap.* (reported
      as memory + swap, as v1's memsw is), pids.current/max (or cgroup.procs when the pids
      controller is off), io.stat, hugetlb.<size>.current/events

A missing file or controller leaves its fields at their zero value: a stats call never
fails because the kernel lacks a knob or the container has just been deleted.
"""

from __future__ import annotations

import os

from ._cgroups import CGROUP_ROOT

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

MAX_UINT64 = (1 << 64) - 1  # what runc prints for a "max" (unlimited) value

# v1 blkio files per runc JSON name, in runc's order of preference: the first group whose
# first file exists and has entries is used (bfq with debug stats, bfq, cfq, throttle).
_BLKIO_GROUPS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("blkio.bfq.sectors_recursive", "sectorsRecursive"),
     ("blkio.bfq.io_service_time_recursive", "ioServiceTimeRecursive"),
     ("blkio.bfq.io_wait_time_recursive", "ioWaitTimeRecursive"),
     ("blkio.bfq.io_merged_recursive", "ioMergedRecursive"),
     ("blkio.bfq.io_queued_recursive", "ioQueueRecursive"),
     ("blkio.bfq.time_recursive", "ioTimeRecursive"),
     ("blkio.bfq.io_serviced_recursive", "ioServicedRecursive"),
     ("blkio.bfq.io_service_bytes_recursive", "ioServiceBytesRecursive")),
    (("blkio.bfq.io_serviced_recursive", "ioServicedRecursive"),
     ("blkio.bfq.io_service_bytes_recursive", "ioServiceBytesRecursive")),
    (("blkio.sectors_recursive", "sectorsRecursive"),
     ("blkio.io_service_time_recursive", "ioServiceTimeRecursive"),
     ("blkio.io_wait_time_recursive", "ioWaitTimeRecursive"),
     ("blkio.io_merged_recursive", "ioMergedRecursive"),
     ("blkio.io_queued_recursive", "ioQueueRecursive"),
     ("blkio.time_recursive", "ioTimeRecursive"),
     ("blkio.io_serviced_recursive", "ioServicedRecursive"),
     ("blkio.io_service_bytes_recursive", "ioServiceBytesRecursive")),
    (("blkio.throttle.io_serviced_recursive", "ioServicedRecursive"),
     ("blkio.throttle.io_service_bytes_recursive", "ioServiceBytesRecursive")),
    (("blkio.throttle.io_serviced", "ioServicedRecursive"),
     ("blkio.throttle.io_service_bytes", "ioServiceBytesRecursive")),
)
_CPUSET_FLAGS = ("cpu_exclusive", "mem_hardwall", "mem_exclusive", "memory_migrate",
                 "memory_spread_page", "memory_spread_slab", "memory_pressure",
                 "sched_load_balance")
# io.stat keys that have a v1 equivalent (runc maps only these four).
_IO_KEYS = {"rbytes": ("ioServiceBytesRecursive", "Read"),
            "wbytes": ("ioServiceBytesRecursive", "Write"),
            "rios": ("ioServicedRecursive", "Read"),
            "wios": ("ioServicedRecursive", "Write")}


def controller_dir(cg: dict[str, Any], controller: str) -> str | None:
    """The container's directory for `controller` ("memory", "cpuacct", "name=systemd"...).

    On v1 the hierarchy key may name several co-mounted controllers ("cpu,cpuacct"), so the
    controller is looked up in each key's list. On v2 every controller shares one
    directory. None when the state has no such hierarchy.
    """
    if not cg:
        return None
    if cg.get("version") == 2:
        path = cg.get("path")
        return path if isinstance(path, str) else None
    paths: dict[str, str] = cg.get("paths") or {}
    for key, d in paths.items():
        if controller in key.split(","):
            return d
    return None


def _read(d: str, name: str) -> str | None:
    try:
        with open(os.path.join(d, name)) as f:
            return f.read()
    except OSError:  # missing file, controller off, cgroup removed (ENODEV): skip it
        return None


def _uint(text: str) -> int | None:
    """A cgroup value as runc parses it: "max" is 2^64-1, negatives are 0, junk is None."""
    t = text.strip()
    if t == "max":
        return MAX_UINT64
    try:
        v = int(t)
    except ValueError:
        return None
    return min(max(v, 0), MAX_UINT64)


def _value(d: str, name: str) -> int | None:
    text = _read(d, name)
    return None if text is None else _uint(text)


def _keyed(d: str, name: str) -> dict[str, int]:
    """A flat-keyed file ("key value" lines: memory.stat, cpu.stat, memory.events)."""
    text = _read(d, name)
    out: dict[str, int] = {}
    if text is None:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            v = _uint(parts[1])
            if v is not None:
                out[parts[0]] = v
    return out


def _set(obj: dict[str, Any], key: str, value: Any) -> None:
    """Set an `omitempty` field: zero, empty and missing values stay out, as in runc."""
    if value:
        obj[key] = value


def _list_ints(text: str | None) -> list[int]:
    if not text:
        return []
    out: list[int] = []
    for word in text.split():
        v = _uint(word)
        if v is None:
            return []
        out.append(v)
    return out


def _cpu_list(text: str | None) -> list[int]:
    """A cpuset list ("0-3,8") expanded, as runc reports cpuset.cpus and cpuset.mems."""
    out: list[int] = []
    for part in (text or "").strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            return []
    return out


def _skeleton() -> dict[str, Any]:
    """Everything runc prints even when it could read nothing."""
    def entry() -> dict[str, int]:
        return {"limit": 0, "failcnt": 0}

    return {
        "cpu": {"usage": {"kernel": 0, "user": 0}, "throttling": {}},
        "cpuset": {**dict.fromkeys(_CPUSET_FLAGS, 0), "sched_relax_domain_level": 0},
        "memory": {"usage": entry(), "swap": entry(), "kernel": entry(), "kernelTCP": entry()},
        "pids": {},
        "blkio": {},
        "hugetlb": {},
        "intel_rdt": {},
        "network_interfaces": None,
    }


def _memory_entry(limit: int | None, usage: int | None, peak: int | None,
                  failcnt: int | None) -> dict[str, int]:
    """runc's MemoryEntry: limit and failcnt always, usage and max when non-zero."""
    out = {"limit": limit or 0}
    _set(out, "usage", usage)
    _set(out, "max", peak)
    out["failcnt"] = failcnt or 0
    return out


def _blkio_lines(text: str | None) -> list[dict[str, Any]]:
    """Lines "MAJ:MIN [Op] VALUE" (the trailing "Total N" line is skipped)."""
    out: list[dict[str, Any]] = []
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) not in (3, 4):
            continue
        try:
            major, minor, value = int(parts[0]), int(parts[1]), int(parts[-1])
        except ValueError:
            continue
        e: dict[str, Any] = {}
        _set(e, "major", major)
        _set(e, "minor", minor)
        _set(e, "op", parts[2] if len(parts) == 4 else "")
        _set(e, "value", value)
        out.append(e)
    return out


def _hugetlb_sizes(d: str, suffix: str) -> list[str]:
    """Page sizes ("2MB", "1GB") from the hugetlb.<size>.<suffix> files present in `d`.

    Listing the directory rather than /sys/kernel/mm/hugepages gives the kernel's own size
    names, which are the map keys runc prints.
    """
    try:
        names = os.listdir(d)
    except OSError:
        return []
    sizes = [n[len("hugetlb."):-len(suffix) - 1] for n in names
             if n.startswith("hugetlb.") and n.endswith("." + suffix) and n.count(".") == 2]
    return sorted(sizes)


def _v1(cg: dict[str, Any], out: dict[str, Any]) -> None:
    cpu = out["cpu"]
    d = controller_dir(cg, "cpuacct")
    if d:
        usage = cpu["usage"]
        _set(usage, "total", _value(d, "cpuacct.usage"))
        _set(usage, "percpu", _list_ints(_read(d, "cpuacct.usage_percpu")))
        kern: list[int] = []
        user: list[int] = []
        for line in (_read(d, "cpuacct.usage_all") or "").splitlines()[1:]:
            f = line.split()  # "cpu user system", ns
            if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
                user.append(int(f[1]))
                kern.append(int(f[2]))
        _set(usage, "percpu_kernel", kern)
        _set(usage, "percpu_user", user)
        ticks = _keyed(d, "cpuacct.stat")  # user/system in USER_HZ ticks
        hz = os.sysconf("SC_CLK_TCK") or 100
        usage["kernel"] = ticks.get("system", 0) * 1_000_000_000 // hz
        usage["user"] = ticks.get("user", 0) * 1_000_000_000 // hz
    d = controller_dir(cg, "cpu")
    if d:
        cs = _keyed(d, "cpu.stat")
        thr = cpu["throttling"]
        _set(thr, "periods", cs.get("nr_periods"))
        _set(thr, "throttledPeriods", cs.get("nr_throttled"))
        _set(thr, "throttledTime", cs.get("throttled_time"))  # already ns on v1

    d = controller_dir(cg, "cpuset")
    if d:
        cpuset = out["cpuset"]
        _set(cpuset, "cpus", _cpu_list(_read(d, "cpuset.cpus")))
        _set(cpuset, "mems", _cpu_list(_read(d, "cpuset.mems")))
        for flag in _CPUSET_FLAGS:
            cpuset[flag] = _value(d, "cpuset." + flag) or 0
        text = _read(d, "cpuset.sched_relax_domain_level")
        if text is not None and text.strip().lstrip("-").isdigit():
            cpuset["sched_relax_domain_level"] = int(text)
        # Keep runc's field order: cpus, cpu_exclusive, mems, then the rest.
        order = ["cpus", "cpu_exclusive", "mems", *_CPUSET_FLAGS[1:], "sched_relax_domain_level"]
        out["cpuset"] = {k: cpuset[k] for k in order if k in cpuset}

    d = controller_dir(cg, "memory")
    if d:
        mem = out["memory"]
        raw = _keyed(d, "memory.stat")
        for key, prefix in (("usage", "memory."), ("swap", "memory.memsw."),
                            ("kernel", "memory.kmem."), ("kernelTCP", "memory.kmem.tcp.")):
            mem[key] = _memory_entry(_value(d, prefix + "limit_in_bytes"),
                                     _value(d, prefix + "usage_in_bytes"),
                                     _value(d, prefix + "max_usage_in_bytes"),
                                     _value(d, prefix + "failcnt"))
        _memory_common(out, raw, raw.get("cache"))

    d = controller_dir(cg, "pids")
    if d:
        _pids(out, d)

    d = controller_dir(cg, "blkio")
    if d:
        for group in _BLKIO_GROUPS:
            first = _blkio_lines(_read(d, group[0][0]))
            if not first:
                continue
            blkio = out["blkio"]
            for name, key in group:
                _set(blkio, key, first if name == group[0][0] else _blkio_lines(_read(d, name)))
            out["blkio"] = _blkio_ordered(blkio)
            break

    d = controller_dir(cg, "hugetlb")
    if d:
        for size in _hugetlb_sizes(d, "usage_in_bytes"):
            h: dict[str, int] = {}
            _set(h, "usage", _value(d, f"hugetlb.{size}.usage_in_bytes"))
            _set(h, "max", _value(d, f"hugetlb.{size}.max_usage_in_bytes"))
            h["failcnt"] = _value(d, f"hugetlb.{size}.failcnt") or 0
            out["hugetlb"][size] = h


def _blkio_ordered(blkio: dict[str, Any]) -> dict[str, Any]:
    order = ("ioServiceBytesRecursive", "ioServicedRecursive", "ioQueueRecursive",
             "ioServiceTimeRecursive", "ioWaitTimeRecursive", "ioMergedRecursive",
             "ioTimeRecursive", "sectorsRecursive")
    return {k: blkio[k] for k in order if k in blkio}


def _memory_common(out: dict[str, Any], raw: dict[str, int], cache: int | None) -> None:
    """`cache` and `raw` go first and last in runc's Memory object."""
    mem = out["memory"]
    new: dict[str, Any] = {}
    _set(new, "cache", cache)
    for key in ("usage", "swap", "kernel", "kernelTCP"):
        new[key] = mem[key]
    _set(new, "raw", raw)
    out["memory"] = new


def _pids(out: dict[str, Any], d: str) -> None:
    pids = out["pids"]
    current = _value(d, "pids.current")
    if current is None:
        # v2 with the pids controller off: count the members, as runc does.
        procs = _read(d, "cgroup.procs")
        current = len(procs.split()) if procs is not None else None
    _set(pids, "current", current)
    limit = _value(d, "pids.max")
    _set(pids, "limit", 0 if limit == MAX_UINT64 else limit)  # runc: unlimited is 0


def _v2(cg: dict[str, Any], out: dict[str, Any]) -> None:
    d = controller_dir(cg, "")
    if not d:
        return
    cs = _keyed(d, "cpu.stat")
    usage = out["cpu"]["usage"]
    _set(usage, "total", cs.get("usage_usec", 0) * 1000)
    usage["kernel"] = cs.get("system_usec", 0) * 1000
    usage["user"] = cs.get("user_usec", 0) * 1000
    thr = out["cpu"]["throttling"]
    _set(thr, "periods", cs.get("nr_periods"))
    _set(thr, "throttledPeriods", cs.get("nr_throttled"))
    _set(thr, "throttledTime", cs.get("throttled_usec", 0) * 1000)

    raw = _keyed(d, "memory.stat")
    mem = out["memory"]
    current = _value(d, "memory.current")
    limit = _value(d, "memory.max")
    mem["usage"] = _memory_entry(limit, current, _value(d, "memory.peak"),
                                 _keyed(d, "memory.events").get("max"))
    swap = _value(d, "memory.swap.current")
    if swap is not None:
        # v1's memsw counts memory + swap; runc reports v2 swap the same way.
        swap_limit = _value(d, "memory.swap.max")
        if swap_limit is not None and swap_limit != MAX_UINT64:
            swap_limit = min(swap_limit + (limit or 0), MAX_UINT64)
        mem["swap"] = _memory_entry(swap_limit, swap + (current or 0),
                                    _value(d, "memory.swap.peak"),
                                    _keyed(d, "memory.swap.events").get("max"))
    _memory_common(out, raw, raw.get("file"))

    _pids(out, d)

    io: dict[str, list[dict[str, Any]]] = {}
    for line in (_read(d, "io.stat") or "").splitlines():
        dev, *items = line.split()
        major, _, minor = dev.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        for item in items:
            k, _, v = item.partition("=")
            if k in _IO_KEYS and v.isdigit():
                table, op = _IO_KEYS[k]
                e: dict[str, Any] = {}
                _set(e, "major", int(major))
                _set(e, "minor", int(minor))
                e["op"] = op
                _set(e, "value", int(v))
                io.setdefault(table, []).append(e)
    out["blkio"] = _blkio_ordered(io)

    for size in _hugetlb_sizes(d, "current"):
        h: dict[str, int] = {}
        _set(h, "usage", _value(d, f"hugetlb.{size}.current"))
        h["failcnt"] = _keyed(d, f"hugetlb.{size}.events").get("max", 0)
        out["hugetlb"][size] = h


def stats(cg: dict[str, Any]) -> dict[str, Any]:
    """runc's stats `data` object for the container whose saved cgroup state is `cg`.

    `cg` is `State.cgroup` (what the cgroup manager's `to_state` saved). Never raises for
    missing files; an empty `cg` gives the all-zero object.
    """
    out = _skeleton()
    if cg.get("version") == 2:
        _v2(cg, out)
    elif cg:
        _v1(cg, out)
    return out


def memory_root(cg: dict[str, Any]) -> str:
    """Where the memory hierarchy holding the container is mounted (its root cgroup)."""
    if cg.get("version") == 2:
        return CGROUP_ROOT
    mounts: dict[str, str] = cg.get("mounts") or {}
    for key, mp in mounts.items():
        if "memory" in key.split(","):
            return mp
    return os.path.join(CGROUP_ROOT, "memory")


def usage(cg: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Memory, CPU and pids of the container whose saved cgroup state is `cg`: the numbers a
    status line or a metrics scrape wants (corrald's control socket), from 5 to 8 files
    instead of the ~40 that `stats` reads. Same sources and units as `stats`: bytes,
    nanoseconds; an unlimited limit reads as runc reports it (2^64-1 on v2, the kernel's
    page-rounded maximum for v1 memory, 0 for pids); what cannot be read is 0.
    """
    v2 = cg.get("version") == 2
    mem = {"usage": 0, "max": 0, "limit": 0, "failcnt": 0}
    cpu = {"usage_ns": 0, "user_ns": 0, "kernel_ns": 0}
    d = controller_dir(cg, "memory")
    if d and v2:
        mem.update(usage=_value(d, "memory.current") or 0, max=_value(d, "memory.peak") or 0,
                   limit=_value(d, "memory.max") or 0,
                   failcnt=_keyed(d, "memory.events").get("max", 0))
    elif d:
        mem.update(usage=_value(d, "memory.usage_in_bytes") or 0,
                   max=_value(d, "memory.max_usage_in_bytes") or 0,
                   limit=_value(d, "memory.limit_in_bytes") or 0,
                   failcnt=_value(d, "memory.failcnt") or 0)
    d = controller_dir(cg, "cpu" if v2 else "cpuacct")
    if d and v2:
        cs = _keyed(d, "cpu.stat")
        cpu.update(usage_ns=cs.get("usage_usec", 0) * 1000, user_ns=cs.get("user_usec", 0) * 1000,
                   kernel_ns=cs.get("system_usec", 0) * 1000)
    elif d:
        ticks = _keyed(d, "cpuacct.stat")
        hz = os.sysconf("SC_CLK_TCK") or 100
        cpu.update(usage_ns=_value(d, "cpuacct.usage") or 0,
                   user_ns=ticks.get("user", 0) * 1_000_000_000 // hz,
                   kernel_ns=ticks.get("system", 0) * 1_000_000_000 // hz)
    out: dict[str, Any] = {"pids": {}}
    d = controller_dir(cg, "pids")
    if d:
        _pids(out, d)
    pids = {"current": out["pids"].get("current", 0), "limit": out["pids"].get("limit", 0)}
    return {"memory": mem, "cpu": cpu, "pids": pids}
