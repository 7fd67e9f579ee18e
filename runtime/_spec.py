"""config.json: the default spec, loading, and validation that names the bad field.

The runtime-spec says unknown properties are ignored, so validation checks the type and
range of every field corral acts on and leaves the rest alone. Every error is a
`ConfigError` naming the field path (`process.args[0]`, `linux.namespaces[2].type`, ...).
"""

from __future__ import annotations

import os

from . import _jsonfast as json
from ._errors import ConfigError, CorralError

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

# Capability names in kernel order: bit N is CAPABILITIES[N].
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_BITS = {name: bit for bit, name in enumerate(CAPABILITIES)}
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}

# namespace type -> (clone flag, /proc/PID/ns name)
NAMESPACES = {
    "pid": (0x20000000, "pid"),
    "network": (0x40000000, "net"),
    "mount": (0x00020000, "mnt"),
    "ipc": (0x08000000, "ipc"),
    "uts": (0x04000000, "uts"),
    "user": (0x10000000, "user"),
    "cgroup": (0x02000000, "cgroup"),
}

HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
              "poststop")

# mount option -> (clear, set) on the mount flags; see mount(8).
MOUNT_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, 16), "atime": (True, 1024), "bind": (False, 4096), "defaults": (False, 0),
    "dev": (True, 4), "diratime": (True, 2048), "dirsync": (False, 128), "exec": (True, 8),
    "mand": (False, 64), "noatime": (False, 1024), "nodev": (False, 4),
    "nodiratime": (False, 2048), "noexec": (False, 8), "nomand": (True, 64),
    "norelatime": (True, 1 << 21), "nostrictatime": (True, 1 << 24), "nosuid": (False, 2),
    "nosymfollow": (False, 256), "rbind": (False, 4096 | 16384), "relatime": (False, 1 << 21),
    "remount": (False, 32), "ro": (False, 1), "rw": (True, 1), "silent": (False, 32768),
    "loud": (True, 32768), "strictatime": (False, 1 << 24), "suid": (True, 2),
    "symfollow": (True, 256), "sync": (False, 16), "lazytime": (False, 1 << 25),
    "nolazytime": (True, 1 << 25), "iversion": (False, 1 << 23), "noiversion": (True, 1 << 23),
}
PROPAGATION = {
    "private": 1 << 18, "rprivate": (1 << 18) | 16384, "shared": 1 << 20,
    "rshared": (1 << 20) | 16384, "slave": 1 << 19, "rslave": (1 << 19) | 16384,
    "unbindable": 1 << 17, "runbindable": (1 << 17) | 16384,
}

SYSCTL_IPC = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
              "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_spec() -> dict[str, Any]:
    """The config.json that `corral spec` writes: runc's default, hostname `corral`."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [f"PATH={DEFAULT_PATH}", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {s: list(caps) for s in ("bounding", "effective", "permitted",
                                                     "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "corral",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def features() -> dict[str, Any]:
    """What `corral features` prints: the same shape as runc's."""
    from ._seccomp import features as seccomp_features

    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2-dev",
        "hooks": list(HOOK_NAMES),
        "mountOptions": sorted([*MOUNT_FLAGS, *PROPAGATION]),
        "linux": {
            "namespaces": sorted(NAMESPACES),
            "capabilities": list(CAPABILITIES),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": seccomp_features(),
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {"org.corral.version": "0.1.0"},
    }


# --- validation -------------------------------------------------------------------------


def _type(v: Any, t: type | tuple[type, ...], field: str, what: str) -> Any:
    # bool is an int in Python; JSON true is never a valid number here.
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise ConfigError(field, f"must be {what}, not {json.dumps(v)[:60]}")
    return v


def _int(v: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    _type(v, int, field, "an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ConfigError(field, f"{v} is out of range {rng}")
    return int(v)


def _str_list(v: Any, field: str) -> list[str]:
    _type(v, list, field, "an array of strings")
    for i, s in enumerate(v):
        _type(s, str, f"{field}[{i}]", "a string")
    return list(v)


def _abs(v: Any, field: str) -> str:
    _type(v, str, field, "a string")
    if not v.startswith("/"):
        raise ConfigError(field, f"{v!r} must be an absolute path")
    return str(v)


def _obj(v: Any, field: str) -> dict[str, Any]:
    return dict(_type(v, dict, field, "an object"))


def _validate_process(p: Any, has_userns: bool) -> None:
    _obj(p, "process")
    if "terminal" in p:
        _type(p["terminal"], bool, "process.terminal", "true or false")
    if "consoleSize" in p:
        cs = _obj(p["consoleSize"], "process.consoleSize")
        for k in ("height", "width"):
            _int(cs.get(k, 0), f"process.consoleSize.{k}", 0, 65535)
    user = _obj(p.get("user", {}), "process.user")
    for k in ("uid", "gid"):
        _int(user.get(k, 0), f"process.user.{k}", 0, 2**32 - 2)
    if "umask" in user:
        _int(user["umask"], "process.user.umask", 0, 0o777)
    for i, g in enumerate(_type(user.get("additionalGids", []), list, "process.user.additionalGids",
                                "an array of integers")):
        _int(g, f"process.user.additionalGids[{i}]", 0, 2**32 - 2)
    if "args" not in p:
        raise ConfigError("process.args", "is required")
    if not _str_list(p["args"], "process.args"):
        raise ConfigError("process.args", "must not be empty")
    if p["args"][0] == "":
        raise ConfigError("process.args[0]", "must not be empty")
    for i, e in enumerate(_str_list(p.get("env", []), "process.env")):
        if "=" not in e:
            raise ConfigError(f"process.env[{i}]", f"{e!r} is not of the form KEY=VALUE")
    if "cwd" not in p:
        raise ConfigError("process.cwd", "is required")
    _abs(p["cwd"], "process.cwd")
    caps = _obj(p.get("capabilities", {}), "process.capabilities")
    for s in CAP_SETS:
        for i, c in enumerate(_str_list(caps.get(s, []), f"process.capabilities.{s}")):
            if c.upper() not in CAP_BITS and ("CAP_" + c.upper()) not in CAP_BITS:
                raise ConfigError(f"process.capabilities.{s}[{i}]", f"unknown capability {c!r}")
    seen: set[str] = set()
    for i, r in enumerate(_type(p.get("rlimits", []), list, "process.rlimits", "an array")):
        f = f"process.rlimits[{i}]"
        _obj(r, f)
        t = _type(r.get("type"), str, f"{f}.type", "a string")
        if t not in RLIMITS:
            raise ConfigError(f"{f}.type", f"unknown rlimit {t!r}")
        if t in seen:
            raise ConfigError(f"{f}.type", f"duplicate rlimit {t!r}")
        seen.add(t)
        soft = _int(r.get("soft", 0), f"{f}.soft", 0, 2**64 - 1)
        hard = _int(r.get("hard", 0), f"{f}.hard", 0, 2**64 - 1)
        if soft > hard:
            raise ConfigError(f"{f}.soft", f"soft limit {soft} is above hard limit {hard}")
    if "noNewPrivileges" in p:
        _type(p["noNewPrivileges"], bool, "process.noNewPrivileges", "true or false")
    if "oomScoreAdj" in p:
        _int(p["oomScoreAdj"], "process.oomScoreAdj", -1000, 1000)
    for k in ("apparmorProfile", "selinuxLabel"):
        if p.get(k):
            raise ConfigError(f"process.{k}", "is not supported by corral (no LSM support yet)")
    del has_userns


def _validate_mounts(mounts: Any) -> None:
    for i, m in enumerate(_type(mounts, list, "mounts", "an array")):
        f = f"mounts[{i}]"
        _obj(m, f)
        if "destination" not in m:
            raise ConfigError(f"{f}.destination", "is required")
        _abs(m["destination"], f"{f}.destination")
        if ".." in m["destination"].split("/"):
            raise ConfigError(f"{f}.destination", "must not contain '..'")
        if "type" in m:
            _type(m["type"], str, f"{f}.type", "a string")
        if "source" in m:
            _type(m["source"], str, f"{f}.source", "a string")
        for j, o in enumerate(_str_list(m.get("options", []), f"{f}.options")):
            if o in ("tmpcopyup", "rro", "rrw") or o.startswith(("idmap", "ridmap")):
                raise ConfigError(f"{f}.options[{j}]", f"mount option {o!r} is not supported")
        opts = m.get("options", [])
        if (m.get("type") == "bind" or "bind" in opts or "rbind" in opts) and not m.get("source"):
            raise ConfigError(f"{f}.source", "is required for a bind mount")


def _validate_hooks(hooks: Any) -> None:
    _obj(hooks, "hooks")
    for name, lst in hooks.items():
        if name not in HOOK_NAMES:
            continue  # unknown properties are ignored (runtime-spec)
        for i, h in enumerate(_type(lst, list, f"hooks.{name}", "an array")):
            f = f"hooks.{name}[{i}]"
            _obj(h, f)
            if "path" not in h:
                raise ConfigError(f"{f}.path", "is required")
            _abs(h["path"], f"{f}.path")
            _str_list(h.get("args", []), f"{f}.args")
            _str_list(h.get("env", []), f"{f}.env")
            if "timeout" in h:
                _int(h["timeout"], f"{f}.timeout", 1)


def _validate_linux(lx: Any, cfg: dict[str, Any]) -> None:
    _obj(lx, "linux")
    seen: set[str] = set()
    for i, ns in enumerate(_type(lx.get("namespaces", []), list, "linux.namespaces", "an array")):
        f = f"linux.namespaces[{i}]"
        _obj(ns, f)
        t = _type(ns.get("type"), str, f"{f}.type", "a string")
        if t not in NAMESPACES:
            raise ConfigError(f"{f}.type", f"unknown namespace type {t!r}")
        if t in seen:
            raise ConfigError(f"{f}.type", f"duplicate namespace {t!r}")
        seen.add(t)
        if ns.get("path"):
            p = _abs(ns["path"], f"{f}.path")
            if not os.path.exists(p):
                raise ConfigError(f"{f}.path", f"{p}: no such file")
    for key in ("uidMappings", "gidMappings"):
        maps = _type(lx.get(key, []), list, f"linux.{key}", "an array")
        for i, m in enumerate(maps):
            f = f"linux.{key}[{i}]"
            _obj(m, f)
            for k in ("containerID", "hostID"):
                _int(m.get(k), f"{f}.{k}", 0, 2**32 - 1)
            _int(m.get("size"), f"{f}.size", 1, 2**32)
        if maps and "user" not in seen:
            raise ConfigError(f"linux.{key}", "needs a user namespace in linux.namespaces")
    user_ns = [n for n in lx.get("namespaces", []) if n.get("type") == "user"]
    if user_ns and not user_ns[0].get("path") and not lx.get("uidMappings"):
        raise ConfigError("linux.uidMappings", "a new user namespace needs uid mappings")
    sysctl = _obj(lx.get("sysctl", {}), "linux.sysctl")
    for k, v in sysctl.items():
        f = f"linux.sysctl.{k}"
        _type(v, str, f, "a string")
        if "/" in k or ".." in k.split(".") or not k:
            raise ConfigError(f, "is not a valid sysctl name")
        if k in SYSCTL_IPC or k.startswith("fs.mqueue."):
            need = "ipc"
        elif k.startswith("net."):
            need = "network"
        elif k in ("kernel.hostname", "kernel.domainname"):
            need = "uts"
        else:
            raise ConfigError(f, "is not namespaced: corral refuses to set it for the host")
        ns = next((n for n in lx.get("namespaces", []) if n.get("type") == need), None)
        if ns is None or ns.get("path"):
            raise ConfigError(f, f"needs a new {need} namespace")
    if "cgroupsPath" in lx:
        _type(lx["cgroupsPath"], str, "linux.cgroupsPath", "a string")
        from ._cgroups import validate_cgroups_path

        validate_cgroups_path(lx["cgroupsPath"])
    if "rootfsPropagation" in lx and lx["rootfsPropagation"] not in PROPAGATION:
        raise ConfigError("linux.rootfsPropagation",
                          f"{lx['rootfsPropagation']!r} is not one of {', '.join(PROPAGATION)}")
    for key in ("maskedPaths", "readonlyPaths"):
        for i, p in enumerate(_str_list(lx.get(key, []), f"linux.{key}")):
            _abs(p, f"linux.{key}[{i}]")
    for i, d in enumerate(_type(lx.get("devices", []), list, "linux.devices", "an array")):
        f = f"linux.devices[{i}]"
        _obj(d, f)
        _abs(d.get("path"), f"{f}.path")
        if d.get("type") not in ("c", "b", "u", "p"):
            raise ConfigError(f"{f}.type", "must be one of c, b, u, p")
        if d["type"] != "p":
            _int(d.get("major"), f"{f}.major", 0)
            _int(d.get("minor"), f"{f}.minor", 0)
        if "fileMode" in d:
            _int(d["fileMode"], f"{f}.fileMode", 0, 0o7777)
    if "resources" in lx:
        _obj(lx["resources"], "linux.resources")
    if lx.get("seccomp") is not None:  # null: no filter, as in runc
        from ._seccomp import validate as validate_seccomp

        validate_seccomp(lx["seccomp"], "linux.seccomp")
    if "hostname" in cfg and cfg["hostname"] and "uts" not in seen:
        raise ConfigError("hostname", "setting a hostname needs a new uts namespace")
    if "domainname" in cfg and cfg["domainname"] and "uts" not in seen:
        raise ConfigError("domainname", "setting a domainname needs a new uts namespace")


def validate(cfg: Any) -> dict[str, Any]:
    """Check every field corral uses; return the config unchanged.

    Raises:
        ConfigError: naming the first bad field.
    """
    _obj(cfg, "(top level)")
    if "ociVersion" in cfg:
        _type(cfg["ociVersion"], str, "ociVersion", "a string")
    root = _obj(cfg.get("root"), "root") if "root" in cfg else None
    if root is None:
        raise ConfigError("root", "is required")
    if "path" not in root:
        raise ConfigError("root.path", "is required")
    _type(root["path"], str, "root.path", "a string")
    if "readonly" in root:
        _type(root["readonly"], bool, "root.readonly", "true or false")
    lx = cfg.get("linux", {})
    has_userns = any(n.get("type") == "user" for n in lx.get("namespaces", [])
                     if isinstance(n, dict)) if isinstance(lx, dict) else False
    if "process" not in cfg:
        raise ConfigError("process", "is required")
    _validate_process(cfg["process"], has_userns)
    for k in ("hostname", "domainname"):
        if k in cfg:
            _type(cfg[k], str, k, "a string")
    _validate_mounts(cfg.get("mounts", []))
    _validate_hooks(cfg.get("hooks", {}))
    _validate_linux(lx, cfg)
    if "annotations" in cfg:
        for k, v in _obj(cfg["annotations"], "annotations").items():
            _type(v, str, f"annotations.{k}", "a string")
    return dict(cfg)


def load_bundle(bundle: str) -> tuple[str, dict[str, Any], str]:
    """(absolute bundle, validated config, absolute rootfs) of a bundle directory.

    Raises:
        CorralError: a missing bundle or config.json, invalid JSON (with line and column),
            or an invalid field.
    """
    bundle = os.path.abspath(bundle)
    if not os.path.isdir(bundle):
        raise CorralError(f"bundle {bundle}: not a directory")
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorralError(f"{path}: no such file (is {bundle} an OCI bundle?)") from None
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise CorralError(f"{path}: invalid JSON: {e}") from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(e.field, e.problem, path) from None
    rootfs = cfg["root"]["path"]
    rootfs = os.path.normpath(os.path.join(bundle, rootfs))
    if not os.path.isdir(rootfs):
        raise ConfigError("root.path", f"{rootfs}: not a directory", path)
    return bundle, cfg, rootfs
