"""OCI `linux.resources` to cgroup file writes, for v1 and v2, in one place.

`plan()` is pure: it validates every field and returns the list of writes (controller, file,
value, and the config field each comes from, for error messages) without touching the
system; the managers in _cgroups.py check that every file exists, remember the old values,
write, and roll back on failure, so that nothing is half-applied. Unit conversions between
v1 and v2 follow runc's (shares to weight, blkio weight to io weight, swap as memory+swap
on v1 and swap alone on v2).
"""

from __future__ import annotations

from ._errors import ConfigError, CorralError

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

UNLIMITED = -1
_MAX_U64 = 2**64 - 1

# The OCI LinuxResources keys, and the keys of each of their objects.
KNOWN: dict[str, set[str] | None] = {
    "devices": None,
    "memory": {"limit", "reservation", "swap", "kernel", "kernelTCP", "swappiness",
               "disableOOMKiller", "useHierarchy", "checkBeforeUpdate"},
    "cpu": {"shares", "quota", "burst", "period", "realtimeRuntime", "realtimePeriod", "cpus",
            "mems", "idle"},
    "pids": {"limit"},
    "blockIO": {"weight", "leafWeight", "weightDevice", "throttleReadBpsDevice",
                "throttleWriteBpsDevice", "throttleReadIOPSDevice", "throttleWriteIOPSDevice"},
    "hugepageLimits": None,
    "network": {"classID", "priorities"},
    "rdma": None,
    "unified": None,
}


class Write:
    """One value for one cgroup file, and the config field it comes from."""

    __slots__ = ("controller", "field", "file", "value")

    def __init__(self, field: str, controller: str, file: str, value: str) -> None:
        self.field = field
        self.controller = controller
        self.file = file
        self.value = value

    def __repr__(self) -> str:
        return f"Write({self.field!r}, {self.controller!r}, {self.file!r}, {self.value!r})"


_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, field: str) -> int:
    """A byte count from `text`: `1048576`, `512k`, `64M`, `1.5g`, `2GiB`, `-1` (unlimited).

    Binary multiples, as runc's units.RAMInBytes; case-insensitive, optional `b`/`ib`.

    Raises:
        CorralError: naming the flag or field, for anything else (negative sizes but -1).
    """
    t = text.strip().lower()
    if t == "-1":
        return UNLIMITED
    for tail in ("ib", "b"):
        if t.endswith(tail) and len(t) > len(tail):
            t = t[: -len(tail)]
            break
    if t.startswith("-"):
        raise CorralError(f"{field}: {text!r}: a size must not be negative (-1 means unlimited)")
    unit = t[-1:] if t[-1:] in _SUFFIX and t[-1:] else ""
    num = t[: len(t) - len(unit)] if unit else t
    whole, dot, frac = num.partition(".")
    try:
        # Plain ASCII digits with at most one fraction: int()/float() would also take
        # "1_000", "+5" and "1e3", which runc's RAMInBytes refuses.
        if not (whole.isascii() and whole.isdigit()) or (
                dot and not (frac.isascii() and frac.isdigit())):
            raise ValueError(num)
        value = float(num) if dot else int(num)
    except ValueError:
        raise CorralError(f"{field}: {text!r} is not a size (like 64M, 512k, 1g or -1)"
                          ) from None
    return int(value * _SUFFIX[unit])


def _int(v: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(field, f"must be an integer, not {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(field, f"{v} is out of range {lo if lo is not None else ''}.."
                          f"{hi if hi is not None else ''}")
    return v


def _limit(v: Any, field: str) -> int:
    """A byte limit: a non-negative integer, or -1 for unlimited."""
    n = _int(v, field)
    if n < -1:
        raise ConfigError(field, f"{n} is negative (use -1 for unlimited)")
    return n


def _obj(v: Any, field: str, keys: set[str] | None) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(field, "must be an object")
    if keys is not None:
        for k in v:
            if k not in keys:
                raise ConfigError(f"{field}.{k}", "unknown key (not in the OCI runtime-spec)")
    return v


def _objects(v: Any, field: str, keys: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """An array of objects with only `keys`: (the field of each, the object), in order."""
    if not isinstance(v, list):
        raise ConfigError(field, "must be an array")
    return [(f"{field}[{i}]", _obj(o, f"{field}[{i}]", keys)) for i, o in enumerate(v)]


def _cpuset(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(field, f"must be a string like \"0-2,4\", not {v!r}")
    for part in v.split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        if not (lo.isascii() and lo.isdigit()) or (dash and not (hi.isascii() and hi.isdigit())):
            raise ConfigError(field, f"{v!r} is not a list like \"0-2,4\"")
    return v


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) to cpu.weight (1..10000), as runc converts them."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_to_io_weight(weight: int) -> int:
    """blkio.weight (10..1000) to io.weight (1..10000), as runc converts them."""
    if weight == 0:
        return 0
    return 1 + ((weight - 10) * 9999) // 990


def _v2max(n: int) -> str:
    return "max" if n == UNLIMITED else str(n)


def _devs(lst: Any, field: str, key: str, lo: int, hi: int | None) -> list[tuple[int, int, int]]:
    out = []
    keys = {"major", "minor", key, "leafWeight"} if key == "weight" else {"major", "minor", key}
    for f, d in _objects(lst, field, keys):
        out.append((_int(d.get("major"), f"{f}.major", 0), _int(d.get("minor"), f"{f}.minor", 0),
                    _int(d.get(key, 0), f"{f}.{key}", lo, hi)))
    return out


def plan(res: Any, version: int, field: str = "linux.resources") -> list[Write]:
    """Every cgroup write that `res` asks for on a cgroup `version` host, validated.

    Devices are not included (see `device_rules`); `unified` is v2 only; `network` and
    `cpu.realtime*` are v1 only.

    Raises:
        ConfigError: naming the first bad or unsupported field.
    """
    res = _obj(res, field, set(KNOWN))
    w: list[Write] = []
    v1 = version == 1

    mem = _obj(res.get("memory", {}), f"{field}.memory", KNOWN["memory"])
    f = f"{field}.memory"
    limit = _limit(mem["limit"], f"{f}.limit") if mem.get("limit") is not None else None
    if limit is not None:
        w.append(Write(f"{f}.limit", "memory", "memory.limit_in_bytes" if v1 else "memory.max",
                       str(limit) if v1 else _v2max(limit)))
    if mem.get("reservation") is not None:
        r = _limit(mem["reservation"], f"{f}.reservation")
        w.append(Write(f"{f}.reservation", "memory",
                       "memory.soft_limit_in_bytes" if v1 else "memory.low",
                       str(r) if v1 else _v2max(r)))
    if mem.get("swap") is not None:
        swap = _limit(mem["swap"], f"{f}.swap")
        if limit is not None and swap != UNLIMITED and limit != UNLIMITED and swap < limit:
            raise ConfigError(f"{f}.swap", f"memory+swap {swap} is below the memory limit "
                              f"{limit} (the OCI swap value counts memory and swap together)")
        if v1:
            w.append(Write(f"{f}.swap", "memory", "memory.memsw.limit_in_bytes", str(swap)))
        elif swap == UNLIMITED:
            w.append(Write(f"{f}.swap", "memory", "memory.swap.max", "max"))
        elif limit is None or limit == UNLIMITED:
            raise ConfigError(f"{f}.swap", "on cgroup v2 a swap limit needs a memory limit "
                              "(memory.swap.max = swap - limit)")
        else:
            w.append(Write(f"{f}.swap", "memory", "memory.swap.max", str(swap - limit)))
    for key, fname in (("kernel", "memory.kmem.limit_in_bytes"),
                       ("kernelTCP", "memory.kmem.tcp.limit_in_bytes")):
        if mem.get(key) is not None:
            n = _limit(mem[key], f"{f}.{key}")
            if not v1:
                raise ConfigError(f"{f}.{key}", "kernel memory limits do not exist on cgroup v2")
            w.append(Write(f"{f}.{key}", "memory", fname, str(n)))
    if mem.get("swappiness") is not None:
        n = _int(mem["swappiness"], f"{f}.swappiness", 0, 100)
        if not v1:
            raise ConfigError(f"{f}.swappiness", "not supported on cgroup v2")
        w.append(Write(f"{f}.swappiness", "memory", "memory.swappiness", str(n)))
    if mem.get("disableOOMKiller"):
        if not v1:
            raise ConfigError(f"{f}.disableOOMKiller", "not supported on cgroup v2")
        w.append(Write(f"{f}.disableOOMKiller", "memory", "memory.oom_control", "1"))

    cpu = _obj(res.get("cpu", {}), f"{field}.cpu", KNOWN["cpu"])
    f = f"{field}.cpu"
    if cpu.get("shares") is not None:
        n = _int(cpu["shares"], f"{f}.shares", 0, 262144)
        if n:
            if n < 2:
                raise ConfigError(f"{f}.shares", f"{n} is below the minimum of 2")
            w.append(Write(f"{f}.shares", "cpu", "cpu.shares" if v1 else "cpu.weight",
                           str(n if v1 else shares_to_weight(n))))
    period = _int(cpu["period"], f"{f}.period", 0, 1_000_000) if cpu.get("period") else None
    if period is not None and period < 1000:
        raise ConfigError(f"{f}.period", f"{period} is below the minimum of 1000 (1 ms)")
    quota = _int(cpu["quota"], f"{f}.quota", -1) if cpu.get("quota") is not None else None
    if quota is not None and 0 <= quota < 1000:
        raise ConfigError(f"{f}.quota", f"{quota} is below the minimum of 1000 (1 ms); "
                          "-1 means unlimited")
    if v1:
        if period is not None:
            w.append(Write(f"{f}.period", "cpu", "cpu.cfs_period_us", str(period)))
        if quota is not None:
            w.append(Write(f"{f}.quota", "cpu", "cpu.cfs_quota_us", str(quota)))
    elif quota is not None or period is not None:
        w.append(Write(f"{f}.quota" if quota is not None else f"{f}.period", "cpu", "cpu.max",
                       f"{_v2max(quota) if quota is not None else '$keep'} "
                       f"{period if period is not None else '$keep'}"))
    if cpu.get("burst") is not None:
        n = _int(cpu["burst"], f"{f}.burst", 0)
        w.append(Write(f"{f}.burst", "cpu", "cpu.cfs_burst_us" if v1 else "cpu.max.burst", str(n)))
    for key, fname in (("realtimePeriod", "cpu.rt_period_us"),
                       ("realtimeRuntime", "cpu.rt_runtime_us")):
        if cpu.get(key):
            n = _int(cpu[key], f"{f}.{key}", -1 if key == "realtimeRuntime" else 1)
            if not v1:
                raise ConfigError(f"{f}.{key}", "realtime scheduling limits do not exist on "
                                  "cgroup v2")
            w.append(Write(f"{f}.{key}", "cpu", fname, str(n)))
    if cpu.get("idle") is not None:
        n = _int(cpu["idle"], f"{f}.idle", 0, 1)
        w.append(Write(f"{f}.idle", "cpu", "cpu.idle", str(n)))
    for key in ("cpus", "mems"):
        if cpu.get(key):
            w.append(Write(f"{f}.{key}", "cpuset", f"cpuset.{key}",
                           _cpuset(cpu[key], f"{f}.{key}")))

    pids = _obj(res.get("pids", {}), f"{field}.pids", KNOWN["pids"])
    if pids.get("limit") is not None:
        n = _int(pids["limit"], f"{field}.pids.limit")
        w.append(Write(f"{field}.pids.limit", "pids", "pids.max", "max" if n <= 0 else str(n)))

    bio = _obj(res.get("blockIO", {}), f"{field}.blockIO", KNOWN["blockIO"])
    f = f"{field}.blockIO"
    if bio.get("weight"):
        n = _int(bio["weight"], f"{f}.weight", 10, 1000)
        w.append(Write(f"{f}.weight", "blkio" if v1 else "io",
                       "blkio.weight" if v1 else "io.weight",
                       str(n) if v1 else f"default {blkio_to_io_weight(n)}"))
    if bio.get("leafWeight"):
        n = _int(bio["leafWeight"], f"{f}.leafWeight", 10, 1000)
        if not v1:
            raise ConfigError(f"{f}.leafWeight", "not supported on cgroup v2")
        w.append(Write(f"{f}.leafWeight", "blkio", "blkio.leaf_weight", str(n)))
    for ma, mi, n in _devs(bio.get("weightDevice", []), f"{f}.weightDevice", "weight", 10, 1000):
        w.append(Write(f"{f}.weightDevice", "blkio" if v1 else "io",
                       "blkio.weight_device" if v1 else "io.weight",
                       f"{ma}:{mi} {n if v1 else blkio_to_io_weight(n)}"))
    for key, v1file, v2key in (("throttleReadBpsDevice", "blkio.throttle.read_bps_device", "rbps"),
                               ("throttleWriteBpsDevice", "blkio.throttle.write_bps_device",
                                "wbps"),
                               ("throttleReadIOPSDevice", "blkio.throttle.read_iops_device",
                                "riops"),
                               ("throttleWriteIOPSDevice", "blkio.throttle.write_iops_device",
                                "wiops")):
        for ma, mi, n in _devs(bio.get(key, []), f"{f}.{key}", "rate", 0, None):
            w.append(Write(f"{f}.{key}", "blkio" if v1 else "io", v1file if v1 else "io.max",
                           f"{ma}:{mi} {n}" if v1 else f"{ma}:{mi} {v2key}={n or 'max'}"))

    for f, h in _objects(res.get("hugepageLimits", []), f"{field}.hugepageLimits",
                         {"pageSize", "limit"}):
        size = h.get("pageSize")
        if not isinstance(size, str) or not size[:-2].isdigit() or size[-2:] not in (
                "KB", "MB", "GB"):
            raise ConfigError(f"{f}.pageSize", f"{size!r} is not a page size like \"2MB\"")
        n = _limit(h.get("limit"), f"{f}.limit")
        w.append(Write(f"{f}.limit", "hugetlb",
                       f"hugetlb.{size}.limit_in_bytes" if v1 else f"hugetlb.{size}.max",
                       str(n) if v1 else _v2max(n)))

    net = _obj(res.get("network", {}), f"{field}.network", KNOWN["network"])
    if net:
        if not v1:
            raise ConfigError(f"{field}.network", "net_cls/net_prio do not exist on cgroup v2")
        if net.get("classID") is not None:
            n = _int(net["classID"], f"{field}.network.classID", 0, 2**32 - 1)
            w.append(Write(f"{field}.network.classID", "net_cls", "net_cls.classid", str(n)))
        for pf, p in _objects(net.get("priorities", []), f"{field}.network.priorities",
                              {"name", "priority"}):
            name = p.get("name")
            if not isinstance(name, str) or not name or " " in name:
                raise ConfigError(f"{pf}.name", "must be an interface name")
            w.append(Write(pf, "net_prio", "net_prio.ifpriomap",
                           f"{name} {_int(p.get('priority'), f'{pf}.priority', 0)}"))

    rdma = res.get("rdma", {})
    if rdma:
        _obj(rdma, f"{field}.rdma", None)
        for dev, lim in rdma.items():
            lf = f"{field}.rdma.{dev}"
            _obj(lim, lf, {"hcaHandles", "hcaObjects"})
            parts = [f"{k2}={_int(lim[k], f'{lf}.{k}', 0)}" for k, k2 in
                     (("hcaHandles", "hca_handle"), ("hcaObjects", "hca_object")) if k in lim]
            if parts:
                w.append(Write(lf, "rdma", "rdma.max", f"{dev} {' '.join(parts)}"))

    uni = _obj(res.get("unified", {}), f"{field}.unified", None)
    if uni:
        if v1:
            raise ConfigError(f"{field}.unified", "needs cgroup v2; this host uses cgroup v1")
        for k, v in uni.items():
            uf = f"{field}.unified.{k}"
            if "/" in k or k.startswith(".") or "." not in k or k.startswith("cgroup."):
                raise ConfigError(uf, "is not a cgroup v2 interface file of a controller")
            if not isinstance(v, str):
                raise ConfigError(uf, "must be a string")
            w.append(Write(uf, k.split(".", 1)[0], k, v))
    return w


# The devices every container may use whatever its rules, as runc allows them: mknod of any
# node, the standard character devices, ptys, and tun/tap.
DEFAULT_ALLOWED = (
    ("c", None, None, "m"), ("b", None, None, "m"),
    ("c", 1, 3, "rwm"), ("c", 1, 8, "rwm"), ("c", 1, 7, "rwm"), ("c", 5, 0, "rwm"),
    ("c", 1, 5, "rwm"), ("c", 1, 9, "rwm"), ("c", 5, 1, "rwm"), ("c", 136, None, "rwm"),
    ("c", 5, 2, "rwm"), ("c", 10, 200, "rwm"),
)


def device_rules(res: dict[str, Any], devices: list[dict[str, Any]] | None = None,
                 field: str = "linux.resources.devices") -> list[dict[str, Any]]:
    """The container's device rules in order: its own, then what it must always have.

    `devices` (linux.devices, the nodes corral creates) are allowed too, as runc does.

    Raises:
        ConfigError: naming the bad rule and key.
    """
    out: list[dict[str, Any]] = []
    for f, r in _objects(res.get("devices", []), field,
                         {"allow", "type", "major", "minor", "access"}):
        if not isinstance(r.get("allow"), bool):
            raise ConfigError(f"{f}.allow", "must be true or false")
        t = r.get("type", "a") or "a"
        if t not in ("a", "b", "c"):
            raise ConfigError(f"{f}.type", f"{t!r} is not one of a, b, c")
        for k in ("major", "minor"):
            v = r.get(k)
            if v is not None and v != -1:
                _int(v, f"{f}.{k}", 0)
        acc = r.get("access", "rwm") or "rwm"
        if not isinstance(acc, str) or set(acc) - set("rwm"):
            raise ConfigError(f"{f}.access", f"{acc!r} is not made of r, w, m")
        out.append({"allow": r["allow"], "type": t, "major": r.get("major"),
                    "minor": r.get("minor"), "access": acc})
    for t, ma, mi, acc in DEFAULT_ALLOWED:
        out.append({"allow": True, "type": t, "major": ma, "minor": mi, "access": acc})
    for d in devices or []:
        if d.get("type") in ("c", "u", "b"):  # "u" (unbuffered) is a character device
            out.append({"allow": True, "type": "b" if d["type"] == "b" else "c",
                        "major": d.get("major"), "minor": d.get("minor"), "access": "rwm"})
    return out


def v1_device_line(rule: dict[str, Any]) -> str:
    """A rule as the v1 devices.allow/devices.deny files want it: `c 1:3 rwm`."""
    def num(v: Any) -> str:
        return "*" if v is None or v == -1 else str(v)

    return f"{rule['type']} {num(rule['major'])}:{num(rule['minor'])} {rule['access']}"
