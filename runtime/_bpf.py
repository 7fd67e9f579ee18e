"""The cgroup v2 device filter: OCI device rules compiled to an eBPF program.

Why: cgroup v2 has no `devices.allow`/`devices.deny` files. The kernel instead runs every
BPF_PROG_TYPE_CGROUP_DEVICE program attached to a process's cgroup (and its ancestors) when
the process opens, or mknods, a device node; a return of 0 denies with EPERM. So
`linux.resources.devices` has to become a small program, loaded with bpf(2) and attached
to the container's cgroup. There is no libbpf here and no compiler: the rules map onto a
straight line of compare-and-skip blocks, so the raw instructions are assembled directly.

Semantics are the v1 devices cgroup's as runc emulates them: the LAST rule that matches a
request decides, and a request no rule matches is denied. The program therefore tests the
rules in reverse order and returns at the first match.

ctypes costs ~2 ms to import, so only commands that set device rules import this module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from ._errors import ConfigError

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

# --- kernel ABI (include/uapi/linux/bpf.h) ---------------------------------------------------

# bpf(2) has no glibc wrapper; the number is per architecture.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)

# enum bpf_cmd
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15  # enum bpf_prog_type
BPF_CGROUP_DEVICE = 6  # enum bpf_attach_type

BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1

# struct bpf_cgroup_dev_ctx: access_type = (BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_*
BPF_DEVCG_ACC_MKNOD = 1
BPF_DEVCG_ACC_READ = 2
BPF_DEVCG_ACC_WRITE = 4
BPF_DEVCG_DEV_BLOCK = 1
BPF_DEVCG_DEV_CHAR = 2

_CTX_ACCESS_TYPE = 0
_CTX_MAJOR = 4
_CTX_MINOR = 8

# `union bpf_attr` grows with every kernel; the kernel accepts a longer attr as long as the
# bytes it does not know are zero, and a shorter one as if zero-padded. 128 bytes covers
# every field used here on any kernel that has cgroup device programs (4.15+).
_ATTR_SIZE = 128

# Opcodes (class | op | source) of the few instructions the filter uses.
_BPF_LDX_MEM_W = 0x01 | 0x60 | 0x00  # dst = *(u32 *)(src + off)
_BPF_ALU32_MOV_X = 0x04 | 0xB0 | 0x08  # w_dst = w_src (zeroes the upper half)
_BPF_ALU32_MOV_K = 0x04 | 0xB0 | 0x00  # w_dst = imm
_BPF_ALU32_AND_K = 0x04 | 0x50 | 0x00  # w_dst &= imm
_BPF_ALU32_RSH_K = 0x04 | 0x70 | 0x00  # w_dst >>= imm
_BPF_JMP_JNE_K = 0x05 | 0x50 | 0x00  # if dst != imm: pc += off
_BPF_JMP_JNE_X = 0x05 | 0x50 | 0x08  # if dst != src: pc += off
_BPF_JMP_EXIT = 0x05 | 0x90  # return r0

INSN_SIZE = 8

# Register use: r1 = ctx on entry; the prologue leaves the request in r2..r5.
_R0, _R1, _R_ACCESS, _R_TYPE, _R_MAJOR, _R_MINOR, _R_TMP = 0, 1, 2, 3, 4, 5, 6

_S32_MAX = 0x7FFF_FFFF
_U32_MAX = 0xFFFF_FFFF

_TYPES = {"a": 0, "b": BPF_DEVCG_DEV_BLOCK, "c": BPF_DEVCG_DEV_CHAR}
_ACCESS_BITS = {"r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE, "m": BPF_DEVCG_ACC_MKNOD}
_ALL_ACCESS = BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE | BPF_DEVCG_ACC_MKNOD


# --- instruction helpers ---------------------------------------------------------------------


def _s32(value: int) -> int:
    """An imm field is s32: the kernel sees the same 32 bits whether we mean u32 or s32."""
    value &= _U32_MAX
    return value - (1 << 32) if value > _S32_MAX else value


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One `struct bpf_insn`. dst_reg is the low nibble on the little-endian hosts we run on."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, _s32(imm))


def _ldx_w(dst: int, src: int, off: int) -> bytes:
    return _insn(_BPF_LDX_MEM_W, dst, src, off)


def _mov32_reg(dst: int, src: int) -> bytes:
    return _insn(_BPF_ALU32_MOV_X, dst, src)


def _mov32_imm(dst: int, imm: int) -> bytes:
    return _insn(_BPF_ALU32_MOV_K, dst, imm=imm)


def _and32_imm(dst: int, imm: int) -> bytes:
    return _insn(_BPF_ALU32_AND_K, dst, imm=imm)


def _rsh32_imm(dst: int, imm: int) -> bytes:
    return _insn(_BPF_ALU32_RSH_K, dst, imm=imm)


def _jne_imm(dst: int, imm: int, off: int) -> bytes:
    return _insn(_BPF_JMP_JNE_K, dst, off=off, imm=imm)


def _jne_reg(dst: int, src: int, off: int) -> bytes:
    return _insn(_BPF_JMP_JNE_X, dst, src, off=off)


def _exit() -> bytes:
    return _insn(_BPF_JMP_EXIT)


# --- compiling -------------------------------------------------------------------------------


class _Rule:
    """One validated rule; None fields are wildcards, `access` is a BPF_DEVCG_ACC_* mask."""

    __slots__ = ("access", "allow", "dev_type", "major", "minor")

    def __init__(self, allow: bool, dev_type: int, major: int | None, minor: int | None,
                 access: int) -> None:
        self.allow = allow
        self.dev_type = dev_type
        self.major = major
        self.minor = minor
        self.access = access


def _device_number(rule: dict[str, Any], key: str, field: str) -> int | None:
    value = rule.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1):
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{field}.{key}", f"must be an integer, not {value!r}")
    if value < 0:
        raise ConfigError(f"{field}.{key}", f"{value} is negative (-1 or absent means any)")
    if value > _U32_MAX:
        raise ConfigError(f"{field}.{key}", f"{value} is out of range 0..{_U32_MAX}")
    return value


def _parse_rule(rule: Any, i: int) -> _Rule:
    """Validate one `linux.resources.devices` entry, naming the bad field like _spec does."""
    field = f"linux.resources.devices[{i}]"
    if not isinstance(rule, dict):
        raise ConfigError(field, f"must be an object, not {rule!r}")
    allow = rule.get("allow")
    if not isinstance(allow, bool):
        raise ConfigError(f"{field}.allow", "is required and must be true or false"
                          if allow is None else f"must be true or false, not {allow!r}")
    dev_type = rule.get("type")
    if dev_type is None:
        dev_type = "a"
    if not isinstance(dev_type, str) or dev_type not in _TYPES:
        raise ConfigError(f"{field}.type", f"must be one of 'a', 'b', 'c', not {dev_type!r}")
    access = rule.get("access")
    if access is None:
        access = "rwm"
    if not isinstance(access, str):
        raise ConfigError(f"{field}.access", f"must be a string, not {access!r}")
    bad = sorted(set(access) - set(_ACCESS_BITS))
    if bad:
        raise ConfigError(f"{field}.access",
                          f"{access!r} has {''.join(bad)!r}; only r, w and m are allowed")
    mask = 0
    for letter in access:
        mask |= _ACCESS_BITS[letter]
    return _Rule(allow, _TYPES[dev_type], _device_number(rule, "major", field),
                 _device_number(rule, "minor", field), mask)


def _match_u32(reg: int, value: int, off: int) -> list[bytes]:
    """Jump by `off` (counted from after the last instruction) unless reg == value.

    A JNE immediate is sign-extended to 64 bits while the loaded field is zero-extended, so
    values above S32_MAX (never a real device number, but valid input) go through a register.
    """
    if value <= _S32_MAX:
        return [_jne_imm(reg, value, off)]
    return [_mov32_imm(_R_TMP, value), _jne_reg(reg, _R_TMP, off)]


def _rule_block(rule: _Rule) -> list[bytes]:
    """The instructions for one rule: skip to the next block on any mismatch, else return.

    Jump offsets count from the instruction after the jump to the next block, so the block
    is laid out back to front: each condition is prepended knowing what follows it.
    """
    conditions: list[list[bytes] | tuple[int, int]] = []
    if rule.dev_type:
        conditions.append((_R_TYPE, rule.dev_type))
    if rule.access != _ALL_ACCESS:
        # Every requested bit must be in the rule: (requested & ~allowed) == 0.
        conditions.append([_mov32_reg(_R_TMP, _R_ACCESS), _and32_imm(_R_TMP, ~rule.access)])
        conditions.append((_R_TMP, 0))
    if rule.major is not None:
        conditions.append((_R_MAJOR, rule.major))
    if rule.minor is not None:
        conditions.append((_R_MINOR, rule.minor))
    verdict = [_mov32_imm(_R0, 1 if rule.allow else 0), _exit()]
    tail: list[bytes] = list(verdict)
    for cond in reversed(conditions):
        if isinstance(cond, list):
            tail = cond + tail
        else:
            reg, value = cond
            tail = _match_u32(reg, value, len(tail)) + tail
    return tail


def compile_device_filter(rules: list[dict[str, Any]]) -> bytes:
    """Compile OCI `linux.resources.devices` rules into a BPF_PROG_TYPE_CGROUP_DEVICE program.

    Returns the raw instructions (8 bytes each). The program returns 1 to allow and 0 to deny;
    the last matching rule wins and no match denies. A request matches a rule when the
    device type agrees (or the rule's type is "a"), major and minor agree (or are wildcards:
    absent, null or -1) and every access bit requested is in the rule's `access`.

    Raises ConfigError naming `linux.resources.devices[i].<key>` for a malformed entry.
    """
    if not isinstance(rules, list):
        raise ConfigError("linux.resources.devices", f"must be an array, not {rules!r}")
    parsed = [_parse_rule(rule, i) for i, rule in enumerate(rules)]
    insns = [
        _ldx_w(_R_ACCESS, _R1, _CTX_ACCESS_TYPE),
        _mov32_reg(_R_TYPE, _R_ACCESS),
        _and32_imm(_R_TYPE, 0xFFFF),
        _rsh32_imm(_R_ACCESS, 16),
        _ldx_w(_R_MAJOR, _R1, _CTX_MAJOR),
        _ldx_w(_R_MINOR, _R1, _CTX_MINOR),
    ]
    for rule in reversed(parsed):
        if rule.access == 0:
            continue  # access "" grants or refuses nothing: no request is within it
        block = _rule_block(rule)
        insns += block
        if len(block) == 2:
            # An unconditional rule: every earlier rule is shadowed, and the verifier
            # rejects unreachable instructions, so stop here (with no default either).
            return b"".join(insns)
    insns += [_mov32_imm(_R0, 0), _exit()]
    return b"".join(insns)


# --- bpf(2) ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong]


def _attr(fmt: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    """A zeroed `union bpf_attr` with `values` packed at its start (the kernel rejects
    non-zero bytes in fields it does not expect for the command)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str,
         path: str | None = None) -> int:
    """bpf(2), raising OSError with errno like `os` does (the _linux._check pattern)."""
    if _SYS_BPF is None:
        raise OSError(errno.ENOSYS, f"{what}: bpf(2) number unknown on {os.uname().machine}")
    result = int(_libc.syscall(_SYS_BPF, cmd, ctypes.addressof(attr), len(attr)))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def _prog_load(insns: bytes, log: ctypes.Array[ctypes.c_char] | None) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"Apache")
    name = b"corral_devices"  # shown by bpftool; [A-Za-z0-9_.], at most 15 bytes
    # struct { u32 prog_type, insn_cnt; u64 insns, license; u32 log_level, log_size;
    #          u64 log_buf; u32 kern_version, prog_flags; char prog_name[16]; ... }
    attr = _attr("<IIQQIIQII16s", BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // INSN_SIZE,
                 ctypes.addressof(code), ctypes.addressof(license),
                 1 if log is not None else 0, len(log) if log is not None else 0,
                 ctypes.addressof(log) if log is not None else 0, 0, 0, name)
    return _bpf(BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD) of the device filter")


def load_device_program(insns: bytes) -> int:
    """Load a device filter (from compile_device_filter) and return the program's fd.

    bpf(2) fds are always close-on-exec. The first attempt runs without a verifier log,
    because a log too small for a big program fails the load by itself (ENOSPC); only if
    the kernel refuses is the load repeated with a log, whose tail goes into the OSError.
    """
    if not insns or len(insns) % INSN_SIZE:
        raise ValueError(f"a BPF program is a non-empty multiple of {INSN_SIZE} bytes")
    try:
        return _prog_load(insns, None)
    except OSError as first:
        log = ctypes.create_string_buffer(1 << 20)
        try:
            fd = _prog_load(insns, log)
        except OSError:
            text = log.value.decode(errors="replace").strip()
            if len(text) > 4000:
                text = "..." + text[-4000:]
            detail = f"\nverifier log:\n{text}" if text else ""
            raise OSError(first.errno, f"{first.strerror}{detail}") from None
        # Refused once and accepted with a log: a transient failure (e.g. ENOMEM).
        return fd


def _prog_id(prog_fd: int) -> int:
    """The kernel-wide id of a loaded program (from `struct bpf_prog_info`'s second u32)."""
    info = ctypes.create_string_buffer(8)
    # struct { u32 bpf_fd, info_len; u64 info; }
    attr = _attr("<IIQ", prog_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "bpf(BPF_OBJ_GET_INFO_BY_FD)")
    return int(struct.unpack_from("<I", info, 4)[0])


def _query(cgroup_fd: int, path: str) -> tuple[int, list[int]]:
    """The attach flags and the ids of the device programs attached to one cgroup itself
    (not inherited from its ancestors)."""
    capacity = 16
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        # struct { u32 target_fd, attach_type, query_flags, attach_flags; u64 prog_ids;
        #          u32 prog_cnt; ... }
        attr = _attr("<IIIIQI", cgroup_fd, BPF_CGROUP_DEVICE, 0, 0,
                     ctypes.addressof(ids), capacity)
        try:
            _bpf(BPF_PROG_QUERY, attr, "bpf(BPF_PROG_QUERY)", path)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # More programs than room: prog_cnt now holds the real count.
            capacity = max(capacity * 2, struct.unpack_from("<I", attr, 24)[0])
            continue
        flags, count = struct.unpack_from("<I", attr, 12)[0], struct.unpack_from("<I", attr, 24)[0]
        return int(flags), [int(ids[i]) for i in range(count)]


def query_device_programs(cgroup_dir: str) -> list[int]:
    """Ids of the device programs attached directly to `cgroup_dir`, in run order."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _query(fd, cgroup_dir)[1]
    finally:
        os.close(fd)


def _attach(cgroup_fd: int, prog_fd: int, flags: int, path: str) -> None:
    # struct { u32 target_fd, attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd; }
    attr = _attr("<IIII", cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, flags)
    _bpf(BPF_PROG_ATTACH, attr, "bpf(BPF_PROG_ATTACH) of the device filter", path)


def _detach_id(cgroup_fd: int, prog_id: int, path: str) -> None:
    """Detach one program by id; one that vanished meanwhile is already what we want."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _attr("<I", prog_id), "bpf(BPF_PROG_GET_FD_BY_ID)")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        attr = _attr("<III", cgroup_fd, fd, BPF_CGROUP_DEVICE)
        _bpf(BPF_PROG_DETACH, attr, "bpf(BPF_PROG_DETACH) of an old device filter", path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    finally:
        os.close(fd)


def attach_device_program(cgroup_dir: str, prog_fd: int) -> None:
    """Make `prog_fd` the one device program of `cgroup_dir`, with no unfiltered window.

    The new program is attached (BPF_F_ALLOW_MULTI) before every other device program on
    the cgroup is detached, so during `corral update` there is always a filter in force;
    for that instant both run and a request needs both to allow it, which is never laxer
    than either. If someone else attached in exclusive or override mode, MULTI is refused
    and only one program may be there: attaching with the same flags swaps it atomically.
    """
    new_id = _prog_id(prog_fd)
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags, old = _query(fd, cgroup_dir)
        if old and not flags & BPF_F_ALLOW_MULTI:
            _attach(fd, prog_fd, flags, cgroup_dir)
            return
        _attach(fd, prog_fd, BPF_F_ALLOW_MULTI, cgroup_dir)
        for prog_id in _query(fd, cgroup_dir)[1]:
            if prog_id != new_id:
                _detach_id(fd, prog_id, cgroup_dir)
    finally:
        os.close(fd)


def set_device_rules(cgroup_dir: str, rules: list[dict[str, Any]]) -> None:
    """Compile, load and attach `rules` as the device filter of the cgroup v2 `cgroup_dir`.

    The program fd is closed afterwards: the attachment holds its own reference, and the
    program goes away when it is detached or the cgroup is removed.
    """
    prog_fd = load_device_program(compile_device_filter(rules))
    try:
        attach_device_program(cgroup_dir, prog_fd)
    finally:
        os.close(prog_fd)
