"""The exec stub: a tiny static program, exec'd from a sealed memfd, that is a container's
process between the runtime's Python and the user's binary (issue 4, CVE-2019-5736 class).

Why: the created init (pid 1, waiting on exec.fifo for `start`) and the child of `exec` (in
the container's pid namespace until its execve) used to be the host's Python. Non-dumpable
kept ordinary container processes out, but one with CAP_SYS_PTRACE and no user namespace
could open /proc/PID/exe (the host's interpreter) and, with CAP_SYS_ADMIN,
/proc/PID/map_files/* (libpython, libc) for writing. Once this program runs, /proc/PID/exe is
a sealed memfd and nothing of the host is mapped in the process: there is nothing to reach.

The program (runtime/_stub.s, embedded below as CODE by scripts/build-stub) is built per use
into an ELF image: an ELF header, a PT_LOAD (read+execute) and a PT_GNU_STACK program header,
the code, and a data block with everything it needs, so that it parses nothing: its mode, fds,
the seccomp filter as BPF (exported by libseccomp), the executable's resolved path and the
texts of its error messages. Its argv and envp are the user's process's own.

The image goes into a memfd (MFD_CLOEXEC | MFD_ALLOW_SEALING, and MFD_EXEC where the kernel
knows it), mode 0111 so that exec leaves the process non-dumpable unless it may read the
file (the stub makes itself non-dumpable first thing anyway), sealed against any change, and
exec'd with execveat(fd, "", AT_EMPTY_PATH) (`os.execve(fd, ...)`).

Only x86-64 has a stub; elsewhere the callers keep their Python path (`SUPPORTED`). Nothing
here is imported by the CLI unless a container is created or exec'd into.
"""

from __future__ import annotations

import fcntl
import os
import struct

from ._init import reset_for_exec

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import NoReturn

SUPPORTED = os.uname().machine == "x86_64"

MODE_INIT, MODE_EXEC = 1, 2
# The failing steps the stub reports (runtime/_stub.s: STEP_*).
(STEP_FORK, STEP_SETSID, STEP_TTY, STEP_CLOEXEC, STEP_SECCOMP, STEP_EXEC, STEP_FIFO,
 STEP_DUMPABLE) = range(1, 9)
STEPS = {STEP_FORK: "fork", STEP_SETSID: "setsid", STEP_TTY: "TIOCSCTTY (controlling terminal)",
         STEP_CLOEXEC: "mark the runtime's socket close-on-exec",
         STEP_SECCOMP: "seccomp: loading the filter", STEP_EXEC: "exec",
         STEP_FIFO: "read exec.fifo", STEP_DUMPABLE: "prctl(PR_SET_DUMPABLE, 0)"}
# The exec mode's datagrams to the runtime: the child's pid, or what failed.
PID = struct.Struct("<i")
FAILURE = struct.Struct("<ii")  # step, errno

# The data block's header (runtime/_stub.s: D_*): mode, fd_a, fd_b, tty, seccomp flags,
# BPF length, BPF offset, path offset, message offset, message length, steps offset,
# errnos offset, then 16 bytes of name.
_HEAD = struct.Struct("<12Q16s")
_BASE = 0x400000  # where the PT_LOAD segment is mapped (ET_EXEC: no relocation)
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_CODE_OFF = _EHDR.size + 2 * _PHDR.size
_MFD_EXEC = 0x0010  # Linux 6.3: ask for an executable memfd when vm.memfd_noexec is 1
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

# BEGIN CODE (scripts/build-stub writes this block from runtime/_stub.s)
CODE = bytes.fromhex(
    "488d1d610200004989e44883ec4041bd08000000b89d000000bf0400000031f631d24531d24531c00f054885c00f88a6"
    "010000b89d000000bf0f000000488d73600f0548833b020f8489000000b801000000488b7b10488b73404801de488b53"
    "480f054885c00f88d301000031c0488b7b104889e6ba400000000f054883f8fc74ea4885c00f8eb4010000b803000000"
    "488b7b100f0541bd0700000031c0488b7b084889e6ba010000000f054883f80174144885c00f84840100004883f8fc74"
    "dbe913010000b803000000488b7b080f05e9aa00000041bd01000000b838000000bf1100000031f631d24531d24531c0"
    "0f054885c00f88de000000742b890424b801000000488b7b084889e6ba040000000f0531ff4885c00f8926010000bf01"
    "000000e91c01000041bd02000000b8700000000f054885c00f889b00000048837b1800741b41bd03000000b810000000"
    "31ffbe0e54000031d20f054885c0787941bd04000000b848000000488b7b08be02000000ba010000000f054885c07859"
    "488b43284885c0742e41bd0500000066890424488b53304801da4889542408b83d010000bf01000000488b73204889e2"
    "0f054885c0782241bd06000000488b7b384801df498d742408498b0424498d54c410b83b0000000f05f7d84189c64883"
    "3b02751e44892c244489742404b801000000488b7b084889e6ba080000000f05eb36488b7b504801df4489eee83a0000"
    "00b801000000bf020000000f05488b7b584801df4489f6e81f000000b801000000bf020000000f05bf7f000000eb05bf"
    "01000000b8e70000000f050fb6070fb6570185c0740b39f07407488d7c1702ebea488d7702c36690"
)
# END CODE


def _table(entries: list[tuple[int, bytes]], fallback: bytes) -> bytes:
    """The stub's lookup table: {u8 key, u8 length, text}..., key 0 holding the fallback."""
    out = bytearray()
    for key, text in [*entries, (0, fallback)]:
        text = text[:255]
        out += bytes((key, len(text))) + text
    return bytes(out)


_ERRNOS: list[bytes] = []


def errno_table() -> bytes:
    """The init mode's errno texts, built once per process (the same for every container)."""
    if not _ERRNOS:
        _ERRNOS.append(_table([(e, f"{os.strerror(e)}\n".encode()) for e in range(1, 134)],
                              b"unknown error\n"))
    return _ERRNOS[0]


def image(mode: int, fd_a: int, fd_b: int, path: str, comm: str, *, tty: bool = False,
          bpf: bytes = b"", seccomp_flags: int = 0, message: bytes = b"",
          steps: bytes = b"") -> bytes:
    """The stub as an ELF executable with its data block.

    Args:
        mode: MODE_INIT or MODE_EXEC.
        fd_a: init: exec.fifo; exec: the runtime's socket.
        fd_b: init: the runtime's socket (the `created` message goes there).
        path: the executable, already resolved (the stub does no PATH lookup).
        comm: the process's name while the stub runs (15 bytes at most are kept).
        tty: exec: make fd 0 the controlling terminal of the new session.
        bpf: the seccomp filter (struct sock_filter[]) to load before execve, or nothing.
        seccomp_flags: the seccomp(2) flags for it.
        message: init: the `created` datagram.
        steps: init: the step table (the prefixes of the error messages).
    """
    errnos = errno_table() if mode == MODE_INIT else _table([], b"")
    off = _HEAD.size
    parts: list[bytes] = []
    offsets = []
    for blob in (bpf, os.fsencode(path) + b"\0", message, steps or _table([], b""), errnos):
        pad = -off % 8
        parts.append(b"\0" * pad + blob)
        off += pad
        offsets.append(off)
        off += len(blob)
    bpf_off, path_off, msg_off, steps_off, errnos_off = offsets
    head = _HEAD.pack(mode, fd_a, fd_b, int(tty), seccomp_flags, len(bpf) // 8, bpf_off,
                      path_off, msg_off, len(message), steps_off, errnos_off,
                      comm.encode()[:15])
    data = head + b"".join(parts)
    size = _CODE_OFF + len(CODE) + len(data)
    ehdr = _EHDR.pack(b"\x7fELF\x02\x01\x01", 2, 62, 1, _BASE + _CODE_OFF, _EHDR.size, 0, 0,
                      _EHDR.size, _PHDR.size, 2, 0, 0, 0)
    load = _PHDR.pack(1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    stack = _PHDR.pack(0x6474E551, 6, 0, 0, 0, 0, 0, 16)  # PT_GNU_STACK, RW: no exec stack
    return ehdr + load + stack + CODE + data


def memfd() -> int:
    """An empty memfd for the stub, close-on-exec, sealable, executable, mode 0111.

    Mode 0111: exec marks the process non-dumpable when it cannot read the file it runs
    (the kernel's would_dump), which closes the instant before the stub's own prctl for any
    process without CAP_DAC_READ_SEARCH/CAP_DAC_OVERRIDE.

    Raises:
        OSError: the kernel refuses (no memfd, or vm.memfd_noexec=2).
    """
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create("corral-stub", flags | _MFD_EXEC)
    except OSError as e:
        if e.errno != 22:  # EINVAL: a kernel before 6.3 does not know MFD_EXEC
            raise
        fd = os.memfd_create("corral-stub", flags)
    try:
        os.fchmod(fd, 0o111)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fill(fd: int, data: bytes) -> None:
    """Write the image into the memfd and seal it: from here on nobody can change it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)


def init_steps(path: str) -> bytes:
    """The init mode's step table: how each failure is worded on stderr."""
    pre = "corral: container init: "
    return _table([(STEP_EXEC, f"{pre}exec {path}: ".encode()),
                   (STEP_SECCOMP, f"{pre}{STEPS[STEP_SECCOMP]}: ".encode()),
                   (STEP_FIFO, f"{pre}{STEPS[STEP_FIFO]}: ".encode()),
                   (STEP_DUMPABLE, f"{pre}{STEPS[STEP_DUMPABLE]}: ".encode())], pre.encode())


def exec_stub(fd: int, args: list[str], env: list[str], preserve_fds: int,
              keep: tuple[int, ...]) -> NoReturn:
    """Reset what Python changed in this process, then exec the stub in memfd `fd`.

    Every fd from 3 + preserve_fds on is marked close-on-exec except `keep`, the fds the stub
    itself still uses (it closes them, or marks them, before its own execve).

    Raises:
        OSError: the exec failed; the process is unchanged but for the signal mask and
            dispositions and the fds marked (what the caller's own exec does anyway).
    """
    reset_for_exec(preserve_fds)
    for k in keep:
        os.set_inheritable(k, True)
    os.execve(fd, args, dict(e.split("=", 1) for e in env))
