"""The container's side of `create`: the two forked stages that become the container.

Stage 1 (forked by the runtime, already in the container's cgroup) joins namespaces given by
path, unshares the new ones (asking the runtime to write uid/gid maps for a new user
namespace) and forks stage 2, reports its pid and exits. Stage 2 is the container's init
(pid 1 in a new pid namespace): it builds the root filesystem, pivots into it, applies every
process setting that must be done from inside, drops privileges and execs the exec stub
(runtime/_stub.py), which reports `created`, blocks on exec.fifo until `start` and execs the
user's process: no process of the container ever sees the host's Python run. Only with
startContainer hooks (or no stub for this machine) does the init wait in Python itself.

Everything travels over one SOCK_SEQPACKET socket as JSON messages, one per datagram:
  runtime -> stage 1: {"type": "bootstrap", ...}       the config and the create options
  stage 1 -> runtime: {"type": "usermap"}               write my uid_map/gid_map now
  runtime -> stage 1: {"type": "ok"}
  stage 1 -> runtime: {"type": "pid", "pid": N}         the init's pid, then stage 1 exits
  runtime -> init:    {"type": "cgroup"}                the init is in its cgroup now
  init    -> runtime: {"type": "hooks"}                 run prestart/createRuntime now
  runtime -> init:    {"type": "ok", "state": {...}}
  init    -> runtime: {"type": "created"}               set up, about to block on the fifo
                                                        (sent by the stub, when it is used)
  runtime -> init:    {"type": "ok"}                    state.json is written
  any     -> runtime: {"type": "error", "msg": "..."}  then the sender exits 1
An end of file in either direction means the other side died: the survivor gives up.

Nothing here may return into the caller's code: every path ends in exec or os._exit. And
nothing may be imported after pivot_root: the container's filesystem has no Python.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import struct
import sys

from . import _jsonfast as json
from . import _linux as L
from . import _sys
from ._errors import CorralError
from ._spec import CAP_BITS, CAP_SETS, DEFAULT_PATH, MOUNT_FLAGS, NAMESPACES, PROPAGATION, RLIMITS

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any, NoReturn

DEFAULT_DEVICES = (
    ("/dev/null", 1, 3), ("/dev/zero", 1, 5), ("/dev/full", 1, 7),
    ("/dev/random", 1, 8), ("/dev/urandom", 1, 9), ("/dev/tty", 5, 0),
)
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914


def send(sock: _sys.Socket, msg: dict[str, Any]) -> None:
    """One JSON message per datagram."""
    sock.send(json.dumps(msg).encode())


def recv(sock: _sys.Socket) -> dict[str, Any] | None:
    """The next message, or None when the other side has gone."""
    raw = sock.recv(1 << 20)
    if not raw:
        return None
    msg: dict[str, Any] = json.loads(raw)
    return msg


def _expect_ok(sock: _sys.Socket) -> dict[str, Any]:
    msg = recv(sock)
    if msg is None or msg.get("type") != "ok":
        os._exit(1)  # the runtime died or gave up on us: nothing to report to
    return msg


def _die(sock: _sys.Socket | None, err: BaseException) -> NoReturn:
    if isinstance(err, CorralError):
        text = str(err)
    elif isinstance(err, OSError):
        text = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        if err.strerror and ":" in err.strerror:  # ours already name the operation
            text = err.strerror + (f" ({err.filename})" if err.filename else "")
    else:
        text = f"{type(err).__name__}: {err}"
    try:
        if sock is None:
            raise OSError
        send(sock, {"type": "error", "msg": text})
    except OSError:
        try:
            os.write(2, f"corral: container init: {text}\n".encode())
        except OSError:
            pass
    os._exit(1)


# --- stage 1 ------------------------------------------------------------------------------


def stage1(sock: _sys.Socket) -> NoReturn:
    """Join and create namespaces, fork the init, report its pid, exit."""
    try:
        # Non-dumpable until the exec: no process of the container may open this one's
        # /proc/PID/exe or memory, which are the host's Python (CVE-2019-5736). The init
        # inherits it; exec of the container's own binary resets it.
        L.prctl(L.PR_SET_DUMPABLE, 0)
        boot = recv(sock)
        if boot is None:
            os._exit(1)
        nss = boot["config"].get("linux", {}).get("namespaces", [])
        # Open every namespace to join first: after joining a mount namespace the paths
        # would resolve in the container's view.
        joins = [(ns["type"], os.open(ns["path"], os.O_RDONLY | os.O_CLOEXEC))
                 for ns in nss if ns.get("path")]
        new_flags = 0
        user_new = False
        for ns in nss:
            if not ns.get("path"):
                if ns["type"] == "user":
                    user_new = True
                elif ns["type"] != "cgroup":  # the init unshares it once in its cgroup
                    new_flags |= NAMESPACES[ns["type"]][0]
        for typ, fd in joins:
            if typ == "user":
                L.setns(fd, L.CLONE_NEWUSER)
        if user_new:
            L.unshare(L.CLONE_NEWUSER)
            send(sock, {"type": "usermap"})
            _expect_ok(sock)
        if user_new or any(t == "user" for t, _ in joins):
            # Become root of the user namespace (needs the maps written above).
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        for typ, fd in joins:
            if typ != "user":
                L.setns(fd, NAMESPACES[typ][0])
            os.close(fd)
        if new_flags:
            L.unshare(new_flags)
        # The init waits on `go` until its pid has been reported, so that the runtime
        # always learns the pid before the init's first message.
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)
            os.close(go_r)
            container_init(sock, boot)
        send(sock, {"type": "pid", "pid": pid})
        os.write(go_w, b"1")
    except BaseException as e:  # anything must end in _exit, never return
        _die(sock, e)
    os._exit(0)


# --- the root filesystem -----------------------------------------------------------------


def secure_join(root: str, unsafe: str) -> str:
    """`root`/`unsafe` with every symlink resolved as if `root` were `/`.

    Why: a mount destination inside a container image may be a symlink pointing anywhere on
    the host (`/etc -> /host/etc`); resolving it inside `root` keeps mounts in the container.
    """
    parts = [p for p in unsafe.split("/") if p]
    done: list[str] = []
    links = 0
    while parts:
        p = parts.pop(0)
        if p == ".":
            continue
        if p == "..":
            if done:
                done.pop()
            continue
        cur = os.path.join(root, *done, p)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            done.append(p)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 255:
                raise CorralError(f"{unsafe}: too many levels of symbolic links")
            target = os.readlink(cur)
            if target.startswith("/"):
                done = []
            parts = [x for x in target.split("/") if x] + parts
            continue
        done.append(p)
    return os.path.join(root, *done)


def parse_mount_options(opts: list[str]) -> tuple[int, list[int], str]:
    """(mount flags, propagation flags, filesystem data) from OCI mount options."""
    flags = 0
    prop: list[int] = []
    data: list[str] = []
    for o in opts:
        if o in MOUNT_FLAGS:
            clear, bit = MOUNT_FLAGS[o]
            flags = flags & ~bit if clear else flags | bit
        elif o in PROPAGATION:
            prop.append(PROPAGATION[o])
        else:
            data.append(o)
    return flags, prop, ",".join(data)


_LOCKED = ((os.ST_NOSUID, L.MS_NOSUID), (os.ST_NODEV, L.MS_NODEV), (os.ST_NOEXEC, L.MS_NOEXEC),
           (os.ST_RDONLY, L.MS_RDONLY), (os.ST_NOATIME, L.MS_NOATIME),
           (os.ST_NODIRATIME, L.MS_NODIRATIME), (os.ST_RELATIME, L.MS_RELATIME))


def _remount(target: str, flags: int) -> None:
    """Bind-remount `target` with `flags`, keeping the flags the kernel locked on it.

    In a user namespace the kernel refuses to clear nosuid/nodev/noexec/atime flags that the
    source mount had; keep them, as runc does.
    """
    base = L.MS_REMOUNT | L.MS_BIND | (flags & ~(L.MS_BIND | L.MS_REC | L.MS_REMOUNT))
    try:
        L.mount(None, target, None, base)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        fl = os.statvfs(target).f_flag
        locked = 0
        for st_bit, ms_bit in _LOCKED:
            if fl & st_bit and ms_bit != L.MS_RDONLY:
                locked |= ms_bit
        L.mount(None, target, None, base | locked)


def _make_target(dest: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(dest, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not os.path.exists(dest):
            os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _mount_cgroup(boot: dict[str, Any], dest: str, flags: int, new_cgroupns: bool) -> None:
    cg = boot["cgroup"]
    ro = flags & L.MS_RDONLY
    os.makedirs(dest, exist_ok=True)
    if cg.get("version") == 2:
        if new_cgroupns:
            L.mount("cgroup2", dest, "cgroup2", flags)
        else:
            L.mount(cg["path"], dest, None, L.MS_BIND | L.MS_REC)
            _remount(dest, flags | L.MS_BIND)
        return
    # v1 (and hybrid): a tmpfs holding one directory per hierarchy, as runc lays it out.
    L.mount("tmpfs", dest, "tmpfs", flags & ~L.MS_RDONLY, "mode=755")
    for key, host_dir in cg["paths"].items():
        sub = os.path.join(dest, os.path.basename(cg["mounts"][key]))
        os.makedirs(sub, exist_ok=True)
        if new_cgroupns:
            data = ",".join(c if c != "" else "none" for c in key.split(","))
            if key.startswith("name="):
                data = "none," + key
            L.mount("cgroup", sub, "cgroup", flags, data)
        else:
            L.mount(host_dir, sub, None, L.MS_BIND | L.MS_REC)
            _remount(sub, flags | L.MS_BIND)
    if cg.get("unified"):
        sub = os.path.join(dest, "unified")
        os.makedirs(sub, exist_ok=True)
        if new_cgroupns:
            L.mount("cgroup2", sub, "cgroup2", flags)
        else:
            L.mount(cg["unified"], sub, None, L.MS_BIND | L.MS_REC)
            _remount(sub, flags | L.MS_BIND)
    if ro:
        L.mount(None, dest, None, L.MS_REMOUNT | flags, "mode=755")


def _mount_one(boot: dict[str, Any], rootfs: str, m: dict[str, Any], new_cgroupns: bool) -> None:
    dest = secure_join(rootfs, m["destination"])
    typ = m.get("type") or ""
    opts = m.get("options") or []
    flags, prop, data = parse_mount_options(opts)
    if typ == "bind" or flags & L.MS_BIND:
        src = m["source"]
        if not src.startswith("/"):
            src = os.path.join(boot["bundle"], src)
        try:
            is_dir = os.path.isdir(src)
            os.stat(src)
        except FileNotFoundError:
            raise CorralError(f"mount {m['destination']}: source {src} does not exist") from None
        _make_target(dest, is_dir)
        L.mount(src, dest, None, L.MS_BIND | (flags & L.MS_REC))
        if flags & ~(L.MS_BIND | L.MS_REC | L.MS_REMOUNT):
            _remount(dest, flags)
    elif typ == "cgroup":
        _mount_cgroup(boot, dest, flags, new_cgroupns)
    else:
        os.makedirs(dest, exist_ok=True)
        L.mount(m.get("source") or typ, dest, typ or None, flags, data or None)
    for p in prop:
        L.mount(None, dest, None, p)


class _CgroupWait:
    """The init's view of its cgroup placement, which the runtime does in parallel.

    The first write to cgroup.procs after an idle spell waits for an RCU grace period
    (~20 ms on these machines); the runtime does it while the init mounts, and the init
    waits only where the cgroup matters: before unsharing the cgroup namespace, before a
    cgroup mount, before any hook runs.
    """

    def __init__(self, sock: _sys.Socket, new_cgroupns: bool) -> None:
        self.sock = sock
        self.new_cgroupns = new_cgroupns
        self.done = False

    def ensure(self) -> None:
        if self.done:
            return
        msg = recv(self.sock)
        if msg is None or msg.get("type") != "cgroup":
            os._exit(1)
        if self.new_cgroupns:
            L.unshare(L.CLONE_NEWCGROUP)
        self.done = True


def _in_userns(boot: dict[str, Any]) -> bool:
    return any(ns.get("type") == "user" for ns in boot["config"]["linux"].get("namespaces", []))


def _create_devices(boot: dict[str, Any], rootfs: str) -> None:
    cfg = boot["config"]
    devices: list[dict[str, Any]] = [
        {"path": p, "type": "c", "major": ma, "minor": mi, "fileMode": 0o666, "uid": 0, "gid": 0}
        for p, ma, mi in DEFAULT_DEVICES
    ]
    listed = {d["path"] for d in cfg["linux"].get("devices", [])}
    devices = [d for d in devices if d["path"] not in listed] + list(
        cfg["linux"].get("devices", []))
    userns = _in_userns(boot)
    for d in devices:
        dest = secure_join(rootfs, d["path"])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if userns:
            # mknod is refused in a user namespace: bind the host's node instead.
            _make_target(dest, False)
            L.mount(d["path"], dest, None, L.MS_BIND)
            continue
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[
            d["type"]]
        try:
            os.unlink(dest)
        except FileNotFoundError:
            pass
        os.mknod(dest, kind | (d.get("fileMode", 0o666) & 0o7777),
                 os.makedev(d.get("major", 0), d.get("minor", 0)))
        os.chown(dest, d.get("uid", 0), d.get("gid", 0))
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("core", "/proc/kcore"), ("ptmx", "pts/ptmx")):
        if link == "core" and not os.path.exists("/proc/kcore"):
            continue
        dest = os.path.join(secure_join(rootfs, "/dev"), link)
        if link == "ptmx" or os.path.islink(dest):
            try:
                os.unlink(dest)
            except FileNotFoundError:
                pass
        try:
            os.symlink(target, dest)
        except FileExistsError:
            pass


def _setup_rootfs(boot: dict[str, Any], cgroup: _CgroupWait) -> None:
    cfg = boot["config"]
    rootfs = boot["rootfs"]
    lx = cfg["linux"]
    prop = PROPAGATION.get(lx.get("rootfsPropagation", ""), L.MS_SLAVE | L.MS_REC)
    L.mount(None, "/", None, prop)
    L.mount(rootfs, rootfs, None, L.MS_BIND | L.MS_REC)
    mounts = cfg.get("mounts") or []
    for m in mounts:
        if m.get("type") == "cgroup":
            cgroup.ensure()
        _mount_one(boot, rootfs, m, cgroup.new_cgroupns)
    dev_bound = any(m["destination"].rstrip("/") == "/dev" and (
        m.get("type") == "bind" or {"bind", "rbind"} & set(m.get("options") or []))
        for m in mounts)
    if not dev_bound:
        _create_devices(boot, rootfs)
    cwd = secure_join(rootfs, cfg["process"]["cwd"])
    try:
        os.makedirs(cwd, 0o755, exist_ok=True)
    except OSError:
        pass  # a read-only image: chdir reports it if the directory is really missing


def _pivot(rootfs: str, no_pivot: bool) -> None:
    if no_pivot:
        os.chdir(rootfs)
        L.mount(rootfs, "/", None, L.MS_MOVE)
        os.chroot(".")
        os.chdir("/")
        return
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        L.pivot_root(".", ".")
        # The old root is now stacked under the new one: detach it, never propagating.
        os.fchdir(old)
        L.mount(None, ".", None, L.MS_SLAVE | L.MS_REC)
        L.umount2(".", L.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old)
        os.close(new)


# --- inside the container -----------------------------------------------------------------


def _loopback_up() -> None:
    s = _sys.inet_dgram()
    try:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | 1))
    finally:
        s.close()


def _setup_console(boot: dict[str, Any]) -> None:
    setup_terminal(boot["config"]["process"], boot["console_fd"], bind_console=True)


def setup_terminal(proc: dict[str, Any], console_fd: int, bind_console: bool,
                   ctty: bool = True) -> None:
    """Make a pty, put its slave on stdio (and /dev/console), send its master to the caller.

    Runs inside the container (after pivot_root, or after joining its mount namespace for
    `exec`), so that the pty belongs to the container's devpts instance. `ctty`: make it
    the controlling terminal now (`exec` leaves that to the session leader it forks).
    """
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    n = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, struct.pack("I", 0)))[0]
    slave_path = f"/dev/pts/{n}"
    slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    user = proc.get("user") or {}
    os.fchown(slave, user.get("uid", 0), user.get("gid", 0))
    size = proc.get("consoleSize")
    if size:
        fcntl.ioctl(slave, TIOCSWINSZ, struct.pack("HHHH", size.get("height", 0),
                                                   size.get("width", 0), 0, 0))
    if bind_console:
        try:
            _make_target("/dev/console", False)
            L.mount(slave_path, "/dev/console", None, L.MS_BIND)
        except OSError:
            pass  # no writable /dev: the process still gets the pty on its stdio
    csock = _sys.from_fd(console_fd)
    _sys.send_fds(csock, slave_path.encode(), [master])
    csock.close()
    os.close(master)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    if ctty:
        fcntl.ioctl(0, TIOCSCTTY, 0)


def _mask_and_readonly(lx: dict[str, Any]) -> None:
    for p in lx.get("readonlyPaths", []):
        try:
            L.mount(p, p, None, L.MS_BIND | L.MS_REC)
        except FileNotFoundError:
            continue
        _remount(p, L.MS_RDONLY | L.MS_REC)
    for p in lx.get("maskedPaths", []):
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                L.mount("tmpfs", p, "tmpfs", L.MS_RDONLY)
            else:
                L.mount("/dev/null", p, None, L.MS_BIND)
        except FileNotFoundError:
            continue


def _lookup(args0: str, env: list[str], cwd: str) -> str:
    if "/" in args0:
        path = args0 if args0.startswith("/") else os.path.join(cwd, args0)
        if not os.path.isfile(path):
            raise CorralError(f"exec: {args0!r}: no such file or directory")
        if not os.access(path, os.X_OK):
            raise CorralError(f"exec: {args0!r}: permission denied")
        return path
    search = DEFAULT_PATH
    for e in env:
        if e.startswith("PATH="):
            search = e[5:]
    for d in search.split(":"):
        cand = os.path.join(d or ".", args0)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise CorralError(f"exec: {args0!r}: executable file not found in $PATH")


def _home(uid: int) -> str:
    try:
        with open("/etc/passwd") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5]
    except OSError:
        pass
    return "/"


def _cap_mask(names: list[str]) -> int:
    mask = 0
    for n in names:
        n = n.upper()
        mask |= 1 << CAP_BITS[n if n.startswith("CAP_") else "CAP_" + n]
    return mask


def finalize_process(proc: dict[str, Any], preserve_fds: int) -> dict[str, Any]:
    """Drop to the process's user and capabilities; return what exec needs.

    Order (runc's): bounding set, keep-caps, groups and ids, the other capability sets,
    ambient, no_new_privs. Shared with `exec` (issue 4).
    """
    user = proc.get("user") or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    caps = proc.get("capabilities")
    last = L.cap_last_cap()
    if caps is not None:
        bounding = _cap_mask(caps.get("bounding", []))
        for cap in range(last + 1):
            if not bounding & (1 << cap):
                try:
                    L.prctl(L.PR_CAPBSET_DROP, cap)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
    L.prctl(L.PR_SET_KEEPCAPS, 1)
    os.setgroups(list(user.get("additionalGids", [])))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    L.prctl(L.PR_SET_KEEPCAPS, 0)
    if caps is not None:
        masks = {s: _cap_mask(caps.get(s, [])) for s in CAP_SETS}
        L.capset(masks["effective"], masks["permitted"], masks["inheritable"])
        L.prctl(L.PR_CAP_AMBIENT, L.PR_CAP_AMBIENT_CLEAR_ALL)
        for cap in range(last + 1):
            if masks["ambient"] & (1 << cap):
                try:
                    L.prctl(L.PR_CAP_AMBIENT, L.PR_CAP_AMBIENT_RAISE, cap)
                except OSError as e:
                    # Ambient needs the cap in permitted and inheritable; runc's default spec
                    # lists ambient without inheritable, so this is expected and harmless.
                    if e.errno != errno.EPERM:
                        raise
    if proc.get("noNewPrivileges"):
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    os.umask(user.get("umask", 0o022))
    env = list(proc.get("env") or [])
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={_home(uid)}")
    return {"env": env, "preserve_fds": preserve_fds}


def reset_for_exec(preserve_fds: int) -> None:
    """Undo what Python changed in this process (signal dispositions and mask), mark every
    fd from 3 + preserve_fds on close-on-exec: what an exec should not inherit."""
    for sig in (_sys.SIGPIPE, _sys.SIGXFSZ, _sys.SIGINT):
        _sys.set_handler(sig, _sys.SIG_DFL)  # Python ignores these; exec keeps SIG_IGN
    _sys.unblock_all()
    L.close_range_cloexec(3 + preserve_fds)


def exec_process(path: str, args: list[str], env: list[str], preserve_fds: int) -> NoReturn:
    """Reset what Python changed in this process, mark extra fds CLOEXEC, exec."""
    reset_for_exec(preserve_fds)
    os.execve(path, args, dict(e.split("=", 1) for e in env))


def _apply_rlimits(proc: dict[str, Any]) -> None:
    for r in proc.get("rlimits", []):
        soft, hard = r.get("soft", 0), r.get("hard", 0)
        inf = resource.RLIM_INFINITY
        try:
            resource.setrlimit(RLIMITS[r["type"]], (inf if soft >= 2**63 else soft,
                                                    inf if hard >= 2**63 else hard))
        except (ValueError, OSError) as e:
            raise CorralError(f"process.rlimits: {r['type']} {soft}/{hard}: {e} "
                              "(raising a hard limit needs CAP_SYS_RESOURCE)") from None


def join_keyring(cid: str) -> None:
    """A session keyring of the container's own (`_ses.ID`), as runc makes."""
    try:
        L.join_session_keyring(f"_ses.{cid}")
    except OSError as e:
        # Keyrings may be unavailable (a kernel without keys, a user-namespace quota); runc
        # also goes on without one.
        if e.errno not in (errno.ENOSYS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise


def settle_process(proc: dict[str, Any]) -> str:
    """From inside the container, before the privilege drop: rlimits, oom_score_adj and the
    working directory of `proc`; returns the path of the program to exec."""
    _apply_rlimits(proc)
    if "oomScoreAdj" in proc:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(proc["oomScoreAdj"]))
    try:
        os.chdir(proc["cwd"])
    except OSError as e:
        raise CorralError(f"process.cwd: {proc['cwd']}: {e.strerror}") from None
    return _lookup(proc["args"][0], proc.get("env") or [], proc["cwd"])


def _init_stub(boot: dict[str, Any], sock: _sys.Socket, path: str, filt: Any,
               flags: int) -> int:
    """The init's exec stub in a sealed memfd, or -1 where the kernel refuses a memfd.

    `filt`: the filter the stub loads after `start` (no_new_privs), or None.
    """
    from . import _stub

    try:
        fd = _stub.memfd()
    except OSError:
        return -1  # vm.memfd_noexec=2, or no memfd at all: the Python path
    try:
        _stub.fill(fd, _stub.image(
            _stub.MODE_INIT, boot["fifo_fd"], sock.fileno(), path, "corral-init",
            bpf=filt.bpf() if filt is not None else b"", seccomp_flags=flags,
            message=json.dumps({"type": "created"}).encode(), steps=_stub.init_steps(path)))
    except BaseException:
        os.close(fd)
        raise
    return fd


def container_init(sock: _sys.Socket, boot: dict[str, Any]) -> NoReturn:
    """Pid 1 of the container: set everything up, wait for start, exec."""
    try:
        cfg = boot["config"]
        proc = cfg["process"]
        lx = cfg["linux"]
        os.setsid()
        os.umask(0)
        if not boot["no_new_keyring"]:
            join_keyring(boot["id"])
        if any(ns["type"] == "network" and not ns.get("path") for ns in lx.get("namespaces", [])):
            _loopback_up()
        cgroup = _CgroupWait(sock, any(ns["type"] == "cgroup" and not ns.get("path")
                                       for ns in lx.get("namespaces", [])))
        if cgroup.new_cgroupns:
            cgroup.ensure()  # mounts made before the unshare would show the host's view
        _setup_rootfs(boot, cgroup)
        cgroup.ensure()
        send(sock, {"type": "hooks"})
        state = _expect_ok(sock).get("state", {})
        from ._hooks import run_hooks

        start_hooks = bool((cfg.get("hooks") or {}).get("startContainer"))
        if start_hooks:
            import subprocess  # noqa: F401 - needed after pivot_root, when imports fail

        run_hooks(cfg, "createContainer", state)
        from . import _stub
        from ._seccomp import kernel_flags, load_around, prepare  # libseccomp: before pivot

        filt = prepare(lx["seccomp"]) if lx.get("seccomp") else None
        _pivot(boot["rootfs"], boot["no_pivot"])
        if proc.get("terminal"):
            _setup_console(boot)
        for k, v in lx.get("sysctl", {}).items():  # before /proc/sys turns read-only
            try:
                with open("/proc/sys/" + k.replace(".", "/"), "w") as f:
                    f.write(v)
            except OSError as e:
                raise CorralError(f"linux.sysctl.{k}: cannot set {v!r}: {e.strerror}") from None
        _mask_and_readonly(lx)
        if cfg["root"].get("readonly"):
            _remount("/", L.MS_RDONLY | L.MS_BIND)
        if cfg.get("hostname"):
            L.sethostname(cfg["hostname"])
        if cfg.get("domainname"):
            L.setdomainname(cfg["domainname"])
        path = settle_process(proc)
        nnp = bool(proc.get("noNewPrivileges"))
        # The waiting init is the exec stub (runtime/_stub.py), not Python, unless
        # startContainer hooks must run in it after `start` (or there is no stub for this
        # machine). Built before the privilege drop and the filter.
        stub = -1
        if _stub.SUPPORTED and not start_hooks:
            stub = _init_stub(boot, sock, path, filt if nnp else None,
                              kernel_flags(lx["seccomp"]) if filt is not None else 0)
        # Drop to the process's user and capabilities now, not after `start`: a created
        # container must not hold the runtime's privileges while it waits (runc does the
        # same). Without no_new_privs the seccomp filter must be loaded while CAP_SYS_ADMIN
        # is still there; with it, as late as possible, just before exec.
        done = load_around(filt if not nnp else None, nnp,
                           lambda: finalize_process(proc, boot["preserve_fds"]))
        if stub >= 0:
            # From here the stub reports `created` (so that no process of the container
            # exists yet while it starts), waits for `start`, loads the filter, execs.
            sys.stdout.flush()
            try:
                _stub.exec_stub(stub, proc["args"], done["env"], boot["preserve_fds"],
                                (boot["fifo_fd"], sock.fileno()))
            except OSError:
                pass  # e.g. a filter refusing execveat: the Python path below still works
            os.close(stub)
        send(sock, {"type": "created"})
        _expect_ok(sock)
        sock.close()
    except BaseException as e:  # must end in _exit, never return
        _die(sock, e)
    try:
        # Blocks until `start` writes a byte. The runtime opened the fifo O_RDWR for us before
        # the fork (a uid-mapped init could not open it in the root-only state directory),
        # so it never reads end of file.
        fifo = boot["fifo_fd"]
        while not os.read(fifo, 1):
            pass
        os.close(fifo)
        run_hooks(cfg, "startContainer", state)  # with the process's privileges, as runc
        if filt is not None and nnp:
            filt.load()
        sys.stdout.flush()
        exec_process(path, proc["args"], done["env"], boot["preserve_fds"])
    except BaseException as e:
        _die(None, e)
