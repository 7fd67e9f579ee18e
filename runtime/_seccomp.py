"""linux.seccomp: validating the profile, building the filter, loading it right before exec.

Why our own ctypes binding to the system's libseccomp.so.2: libseccomp is the well-kept piece
(it knows every architecture's syscall table, the pseudo-syscalls, the BPF layout and the
kernel's quirks; runc and crun use it too), while a Python wrapper would only add a PyPI
dependency to keep up with. The binding is the handful of functions below. Nothing is loaded
unless a config has `linux.seccomp`: `validate` is pure Python, and ctypes and the library are
loaded only by `prepare`, so every other command and module runs without libseccomp.

When (the order is runc's):
  * `prepare` runs in the container's init BEFORE pivot_root, while the host's libraries can
    still be found: it loads libseccomp and builds the whole filter in memory.
  * `Filter.load` installs it as late as possible. Without noNewPrivileges, installing a
    filter needs CAP_SYS_ADMIN, so it is loaded before the capabilities are dropped; with
    noNewPrivileges it is loaded after, just before exec. `load_around` does that choice.

libseccomp sets no_new_privs itself on load by default; corral turns that off
(SCMP_FLTATR_CTL_NNP = 0) so that only `process.noNewPrivileges` decides, as in runc.
"""

from __future__ import annotations

import errno
import os

from ._errors import ConfigError, CorralError
from ._spec import _int, _obj, _str_list, _type

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

# action -> (its value in libseccomp, whether errnoRet goes into its low 16 bits)
ACTIONS: dict[str, tuple[int, bool]] = {
    "SCMP_ACT_KILL": (0x00000000, False),
    "SCMP_ACT_KILL_THREAD": (0x00000000, False),
    "SCMP_ACT_KILL_PROCESS": (0x80000000, False),
    "SCMP_ACT_TRAP": (0x00030000, False),
    "SCMP_ACT_ERRNO": (0x00050000, True),
    "SCMP_ACT_TRACE": (0x7FF00000, True),
    "SCMP_ACT_LOG": (0x7FFC0000, False),
    "SCMP_ACT_ALLOW": (0x7FFF0000, False),
}
UNSUPPORTED_ACTIONS = ("SCMP_ACT_NOTIFY",)  # needs a seccomp agent at listenerPath

OPERATORS = {
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
}

# OCI name -> libseccomp's name (seccomp_arch_resolve_name)
ARCHES = {
    "SCMP_ARCH_X86": "x86", "SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm", "SCMP_ARCH_AARCH64": "aarch64", "SCMP_ARCH_MIPS": "mips",
    "SCMP_ARCH_MIPS64": "mips64", "SCMP_ARCH_MIPS64N32": "mips64n32",
    "SCMP_ARCH_MIPSEL": "mipsel", "SCMP_ARCH_MIPSEL64": "mipsel64",
    "SCMP_ARCH_MIPSEL64N32": "mipsel64n32", "SCMP_ARCH_PPC": "ppc", "SCMP_ARCH_PPC64": "ppc64",
    "SCMP_ARCH_PPC64LE": "ppc64le", "SCMP_ARCH_S390": "s390", "SCMP_ARCH_S390X": "s390x",
    "SCMP_ARCH_PARISC": "parisc", "SCMP_ARCH_PARISC64": "parisc64",
    "SCMP_ARCH_RISCV64": "riscv64",
}

# libseccomp filter attributes (enum scmp_filter_attr)
_FLTATR_CTL_NNP = 3
_FLTATR_CTL_TSYNC = 4
_FLTATR_CTL_LOG = 6
_FLTATR_CTL_SSB = 7
_FLTATR_API_SYSRAWRC = 9

# linux.seccomp.flags -> the libseccomp attribute that asks for it
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": _FLTATR_CTL_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": _FLTATR_CTL_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": _FLTATR_CTL_SSB,
}

_NR_SCMP_ERROR = -1  # seccomp_syscall_resolve_name: a name libseccomp does not know
_MAX_ARGS = 6
_LIBRARY = "libseccomp.so.2"


def features() -> dict[str, Any]:
    """The `linux.seccomp` part of `corral features`, in runc's shape."""
    return {
        "enabled": True,
        "actions": sorted([*ACTIONS]),
        "operators": sorted(OPERATORS),
        "archs": sorted(ARCHES),
        "knownFlags": list(FLAGS),
        "supportedFlags": list(FLAGS),
    }


# --- validation (pure Python) --------------------------------------------------------------


def enabled(sec: dict[str, Any]) -> bool:
    """False for a profile with neither defaultAction nor syscalls: runc runs it unfiltered."""
    return bool(sec.get("defaultAction") or sec.get("syscalls"))


def _action(v: Any, field: str) -> str:
    _type(v, str, field, "a string")
    if v in UNSUPPORTED_ACTIONS:
        raise ConfigError(field, f"{v} is not supported by corral (no seccomp notify agent)")
    if v not in ACTIONS:
        raise ConfigError(field, f"unknown action {v!r}; one of {', '.join(ACTIONS)}")
    return str(v)


def validate(sec: Any, field: str = "linux.seccomp") -> None:
    """Check a runtime-spec seccomp profile; name the first bad field exactly.

    Raises:
        ConfigError: e.g. `linux.seccomp.syscalls[2].args[0].op: unknown operator 'EQ'`.
    """
    _obj(sec, field)
    for k in ("listenerPath", "listenerMetadata"):
        if sec.get(k):
            raise ConfigError(f"{field}.{k}", "is not supported by corral (no SCMP_ACT_NOTIFY)")
    if "defaultAction" in sec:
        _action(sec["defaultAction"], f"{field}.defaultAction")
    elif sec.get("syscalls"):
        raise ConfigError(f"{field}.defaultAction", "is required when syscalls are listed")
    if "defaultErrnoRet" in sec:
        _int(sec["defaultErrnoRet"], f"{field}.defaultErrnoRet", 0, 0xFFFF)
    for i, a in enumerate(_str_list(sec.get("architectures", []), f"{field}.architectures")):
        if a not in ARCHES:
            raise ConfigError(f"{field}.architectures[{i}]", f"unknown architecture {a!r}")
    for i, fl in enumerate(_str_list(sec.get("flags", []), f"{field}.flags")):
        if fl not in FLAGS:
            raise ConfigError(f"{field}.flags[{i}]",
                              f"unknown or unsupported flag {fl!r}; one of {', '.join(FLAGS)}")
    syscalls = _type(sec.get("syscalls", []), list, f"{field}.syscalls", "an array")
    for i, sc in enumerate(syscalls):
        f = f"{field}.syscalls[{i}]"
        _obj(sc, f)
        if "names" not in sc:
            raise ConfigError(f"{f}.names", "is required")
        names = _str_list(sc["names"], f"{f}.names")
        if not names:
            raise ConfigError(f"{f}.names", "must name at least one syscall")
        for j, n in enumerate(names):
            if not n:
                raise ConfigError(f"{f}.names[{j}]", "must not be empty")
        if "action" not in sc:
            raise ConfigError(f"{f}.action", "is required")
        _action(sc["action"], f"{f}.action")
        if "errnoRet" in sc:
            _int(sc["errnoRet"], f"{f}.errnoRet", 0, 0xFFFF)
        for j, arg in enumerate(_type(sc.get("args", []), list, f"{f}.args", "an array")):
            af = f"{f}.args[{j}]"
            _obj(arg, af)
            for k in ("index", "value", "op"):
                if k not in arg:
                    raise ConfigError(f"{af}.{k}", "is required")
            _int(arg["index"], f"{af}.index", 0, _MAX_ARGS - 1)
            _int(arg["value"], f"{af}.value", 0, 2**64 - 1)
            if "valueTwo" in arg:
                _int(arg["valueTwo"], f"{af}.valueTwo", 0, 2**64 - 1)
            op = _type(arg["op"], str, f"{af}.op", "a string")
            if op not in OPERATORS:
                raise ConfigError(f"{af}.op", f"unknown operator {op!r}; one of "
                                  f"{', '.join(OPERATORS)}")


def action_value(name: str, errno_ret: int | None) -> int:
    """libseccomp's value of an action; ERRNO and TRACE carry errnoRet (default EPERM).

    errnoRet is ignored with the other actions, as runc does.
    """
    base, takes = ACTIONS[name]
    if not takes:
        return base
    return base | ((errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF)


def conditions(args: list[dict[str, Any]]) -> list[list[tuple[int, int, int, int]]]:
    """The argument conditions of one syscall entry, grouped into rules (runc's rule).

    All on distinct argument indexes: one rule holding them all (they must all match). Two on
    the same index could never both hold in one rule, so then each is a rule of its own (any
    one matching is enough). A condition is (index, operator, value, valueTwo).
    """
    conds = [(a["index"], OPERATORS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in args]
    if len({c[0] for c in conds}) == len(conds):
        return [conds]
    return [[c] for c in conds]


# --- libseccomp ----------------------------------------------------------------------------


def _load_library() -> Any:
    import ctypes

    try:
        lib: Any = ctypes.CDLL(_LIBRARY)
    except OSError as e:
        raise CorralError(f"linux.seccomp: cannot load {_LIBRARY} ({e}); install libseccomp2 "
                          "or remove linux.seccomp") from None

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    vp, u32, cint = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    for name, res, args in (
        ("seccomp_init", vp, [u32]),
        ("seccomp_release", None, [vp]),
        ("seccomp_attr_set", cint, [vp, cint, u32]),
        ("seccomp_arch_resolve_name", u32, [ctypes.c_char_p]),
        ("seccomp_arch_add", cint, [vp, u32]),
        ("seccomp_syscall_resolve_name", cint, [ctypes.c_char_p]),
        ("seccomp_rule_add_array", cint, [vp, u32, cint, ctypes.c_uint, ctypes.POINTER(ArgCmp)]),
        ("seccomp_load", cint, [vp]),
        ("seccomp_export_pfc", cint, [vp, cint]),
        ("seccomp_export_bpf", cint, [vp, cint]),
    ):
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    lib.ArgCmp = ArgCmp
    return lib


def _strerror(rc: int) -> str:
    return os.strerror(-rc) if rc < 0 else f"error {rc}"


class Filter:
    """A filter built by libseccomp in this process's memory, not yet installed."""

    def __init__(self, lib: Any, ctx: int) -> None:
        self._lib = lib
        self._ctx: int | None = ctx
        # Bound now: after pivot_root no library can be looked up, and dlsym is avoided.
        self._load = lib.seccomp_load
        self._export_bpf = lib.seccomp_export_bpf

    def load(self) -> None:
        """Install the filter on this thread (seccomp_load); it is inherited across exec."""
        if self._ctx is None:
            raise CorralError("seccomp: the filter was released")
        rc = self._load(self._ctx)
        if rc < 0:
            hint = " (without noNewPrivileges this needs CAP_SYS_ADMIN)" if rc in (
                -errno.EACCES, -errno.EPERM) else ""
            raise OSError(-rc, f"seccomp_load: {_strerror(rc)}{hint}")

    def pfc(self) -> str:
        """The filter in libseccomp's readable pseudo-filter-code (for tests and debugging)."""
        return self._export(self._lib.seccomp_export_pfc, "seccomp_export_pfc").decode()

    def bpf(self) -> bytes:
        """The filter as the kernel takes it: struct sock_filter[] (8 bytes an instruction).

        Why: the exec stub (runtime/_stub.py) loads it with seccomp(2) itself, right before
        its execve, when the process has no_new_privs.
        """
        return self._export(self._export_bpf, "seccomp_export_bpf")

    def _export(self, fn: Any, name: str) -> bytes:
        if self._ctx is None:
            raise CorralError("seccomp: the filter was released")
        fd = os.memfd_create("corral-seccomp-export", os.MFD_CLOEXEC)
        try:
            rc = fn(self._ctx, fd)
            if rc < 0:
                raise OSError(-rc, f"{name}: {_strerror(rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Free libseccomp's context (exec frees it anyway)."""
        if self._ctx is not None:
            self._lib.seccomp_release(self._ctx)
            self._ctx = None


def prepare(sec: dict[str, Any], field: str = "linux.seccomp") -> Filter | None:
    """Build the filter of a validated profile; None when the profile is disabled.

    Call it before pivot_root: this loads ctypes and libseccomp. Syscall names this
    architecture's libseccomp does not know are skipped (runc does the same), and so are
    rules whose action is the default action.

    Raises:
        ConfigError: naming the field libseccomp or the kernel refused.
        CorralError: libseccomp.so.2 cannot be loaded.
    """
    if not enabled(sec):
        return None
    lib = _load_library()
    default = action_value(sec["defaultAction"], sec.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise ConfigError(f"{field}.defaultAction",
                          f"libseccomp refused {sec['defaultAction']} (kernel too old?)")
    filt = Filter(lib, ctx)
    try:
        _build(lib, ctx, sec, field, default)
    except BaseException:
        filt.release()
        raise
    return filt


def _build(lib: Any, ctx: int, sec: dict[str, Any], field: str, default: int) -> None:
    rc = lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 0)
    if rc < 0:
        raise CorralError(f"seccomp: cannot turn off libseccomp's no_new_privs: {_strerror(rc)}")
    lib.seccomp_attr_set(ctx, _FLTATR_API_SYSRAWRC, 1)  # the kernel's errno from load; optional
    for i, a in enumerate(sec.get("architectures") or []):
        f = f"{field}.architectures[{i}]"
        token = lib.seccomp_arch_resolve_name(ARCHES[a].encode())
        if not token:
            raise ConfigError(f, f"{a} is not known to this libseccomp")
        rc = lib.seccomp_arch_add(ctx, token)
        if rc < 0 and rc != -errno.EEXIST:  # the native one is always there
            raise ConfigError(f, f"libseccomp cannot add {a}: {_strerror(rc)}")
    for i, fl in enumerate(sec.get("flags") or []):
        rc = lib.seccomp_attr_set(ctx, FLAGS[fl], 1)
        if rc < 0:
            raise ConfigError(f"{field}.flags[{i}]",
                              f"{fl} is not supported by this kernel or libseccomp: "
                              f"{_strerror(rc)}")
    for i, sc in enumerate(sec.get("syscalls") or []):
        f = f"{field}.syscalls[{i}]"
        act = action_value(sc["action"], sc.get("errnoRet"))
        if act == default:
            continue  # libseccomp refuses it (EACCES), and it would change nothing
        rules = conditions(sc.get("args") or [])
        arrays = []
        for rule in rules:
            arr = (lib.ArgCmp * max(len(rule), 1))()
            for k, (index, op, a, b) in enumerate(rule):
                arr[k].arg, arr[k].op, arr[k].datum_a, arr[k].datum_b = index, op, a, b
            arrays.append((len(rule), arr))
        for j, name in enumerate(sc["names"]):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                continue  # not a syscall of this architecture (or this libseccomp)
            for count, arr in arrays:
                rc = lib.seccomp_rule_add_array(ctx, act, nr, count, arr)
                if rc < 0:
                    raise ConfigError(f"{f}.names[{j}]", f"libseccomp refused the rule for "
                                      f"{name!r}: {_strerror(rc)}")


def kernel_flags(sec: dict[str, Any]) -> int:
    """seccomp(2)'s flags for the profile's `flags` (what seccomp_load passes for them)."""
    bits = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
    flags = 0
    for fl in sec.get("flags") or []:
        flags |= bits[fl]
    return flags


def load_around(filt: Filter | None, nnp: bool, finalize: Callable[[], T]) -> T:
    """Run `finalize` (the privilege drop) and load `filt` on the right side of it.

    Without no_new_privs the kernel lets only a CAP_SYS_ADMIN holder install a filter, so it
    goes in before the capabilities are dropped; with no_new_privs it goes in after, so that
    as few syscalls as possible run under it before exec (runc's order).
    """
    if filt is not None and not nnp:
        filt.load()
    result = finalize()
    if filt is not None and nnp:
        filt.load()
    return result
