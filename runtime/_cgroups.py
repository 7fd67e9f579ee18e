"""cgroup managers: one interface, a v1 and a v2 implementation.

Detection reads /proc/self/mountinfo once: a cgroup2 filesystem at /sys/fs/cgroup means a
pure v2 host; v1 hierarchies there mean v1, and a cgroup2 at /sys/fs/cgroup/unified beside
them is the hybrid layout (systemd's), which corral handles as v1 plus the unified directory
(crun refuses such hosts; runc, like corral, does not).

A manager knows the directories of one container and which of them corral itself created:
`destroy` removes exactly those, deepest first, and nothing else.
"""

from __future__ import annotations

import errno
import os
import time

from ._errors import CorralError
from ._resources import Write, device_rules, plan, v1_device_line

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"


class Hierarchy:
    """One mounted cgroup hierarchy: where it is and what it controls."""

    __slots__ = ("controllers", "mount_root", "mountpoint", "name", "version")

    def __init__(self, version: int, mountpoint: str, mount_root: str,
                 controllers: list[str], name: str) -> None:
        self.version = version
        self.mountpoint = mountpoint
        self.mount_root = mount_root
        self.controllers = controllers
        self.name = name


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def _slurp(path: str) -> str:
    """A whole (proc or cgroup) file, read with plain os calls.

    Why not `open()`: it adds an fstat, an ioctl and lseeks to every file, and three Python
    objects; a create reads and writes a few dozen of these files in a freshly forked
    process, where every bit of Python run costs copy-on-write faults.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return os.fsdecode(b"".join(chunks))


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, from /proc/self/mountinfo."""
    found: list[Hierarchy] = []
    for line in _slurp("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        mountpoint = _unescape(fields[4])
        if not (mountpoint == CGROUP_ROOT or mountpoint.startswith(CGROUP_ROOT + "/")):
            continue
        if rfields[0] == "cgroup2":
            found.append(Hierarchy(2, mountpoint, _unescape(fields[3]), [], ""))
            continue
        opts = rfields[2].split(",")
        ctrls = [o for o in opts if o not in ("rw", "ro") and "=" not in o
                 and o not in ("relatime", "noatime", "nosuid", "nodev", "noexec",
                               "clone_children", "xattr", "noprefix", "cpuset_v2_mode")]
        named = [o[5:] for o in opts if o.startswith("name=")]
        name = ",".join(ctrls) if ctrls else ("name=" + named[0] if named else "")
        found.append(Hierarchy(1, mountpoint, _unescape(fields[3]), ctrls, name))
    return found


def own_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy key ("" for v2, "memory", "name=systemd", ...)."""
    out: dict[str, str] = {}
    for line in _slurp("/proc/self/cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out


def _rel(parent: str, own: str, mount_root: str, cgroups_path: str) -> str:
    """The directory for `cgroups_path` inside one hierarchy mounted at `parent`."""
    if cgroups_path.startswith("/"):
        rel = cgroups_path
    else:
        base = own
        if mount_root != "/" and base.startswith(mount_root):
            base = base[len(mount_root):] or "/"
        rel = os.path.join(base, cgroups_path)
    rel = os.path.normpath("/" + rel.lstrip("/"))
    return os.path.join(parent, rel.lstrip("/"))


def _mkdirs(path: str, stop: str, created: list[str], on_new: Any = None) -> None:
    """mkdir -p below `stop`, recording the directories made (parents first).

    A shared parent (`/corral`) can vanish between the walk and the mkdir, when the last
    container under it is deleted at that moment: then walk again.
    """
    for attempt in range(5):
        todo: list[str] = []
        p = path
        while p != stop and not os.path.isdir(p):
            todo.append(p)
            p = os.path.dirname(p)
        try:
            for d in reversed(todo):
                try:
                    os.mkdir(d, 0o755)
                except FileExistsError:
                    continue
                created.append(d)
                if on_new is not None:
                    on_new(d)
            return
        except FileNotFoundError:
            if attempt == 4:
                raise


def _rmdirs(created: list[str]) -> None:
    """Remove the directories corral made, deepest first; a shared parent still in use stays."""
    for d in sorted(created, key=len, reverse=True):
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY: tasks of a just-killed container are still leaving (wait for them),
                # or child cgroups: a parent another container still uses (leave it).
                if (e.errno == errno.EBUSY and time.monotonic() < deadline
                        and not _has_children(d)):
                    time.sleep(0.005)
                    continue
                if e.errno in (errno.ENOTEMPTY, errno.EBUSY):
                    break
                raise


def _has_children(d: str) -> bool:
    try:
        return any(e.is_dir(follow_symlinks=False) for e in os.scandir(d))
    except OSError:
        return False


def _read_pids(path: str) -> list[int]:
    try:
        return [int(x) for x in _slurp(os.path.join(path, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


class MigrationWarmup:
    """Pay the cgroup migration's RCU grace period in a thread, while the CLI does other work.

    Every write to cgroup.procs takes the kernel's global cgroup_threadgroup_rwsem for
    writing; the first one after an idle spell waits for an RCU grace period (~5-20 ms on
    these machines), later ones within a grace period take ~0.2 ms. `start()` moves this
    process into the cgroup it is already in (a no-op migration that still takes the lock)
    from a thread, so that the real placement of the init, done right after, is fast.
    `wait()` must be called before forking: a fork must not race a thread in a syscall.

    `wanted`: a process that knows the grace period is being paid anyway turns the warm-up
    off for itself (the namespace helper's creator while other creates are in flight: their
    `cgroup.procs` writes keep the lock in its slow mode, and a thread plus a migration per
    container would only cost CPU).
    """

    wanted = True

    def __init__(self) -> None:
        import _thread

        self._done = _thread.allocate_lock()
        if not MigrationWarmup.wanted:
            return
        self._done.acquire()
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            with open("/proc/self/cgroup") as f:
                lines = f.read().splitlines()
            for line in lines:
                _, ctrls, path = line.split(":", 2)
                if ctrls:
                    base = os.path.join(CGROUP_ROOT, ctrls.replace("name=", ""))
                elif os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.procs")):
                    base = CGROUP_ROOT
                else:
                    base = os.path.join(CGROUP_ROOT, "unified")
                procs = os.path.join(base + path, "cgroup.procs")
                try:
                    fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    os.write(fd, str(os.getpid()).encode())
                except OSError:
                    pass  # refused or not: the lock was taken, which is all we want
                finally:
                    os.close(fd)
                break
        except Exception:
            pass
        finally:
            self._done.release()

    def wait(self) -> None:
        self._done.acquire()
        self._done.release()


class Manager:
    """What the runtime needs from a cgroup implementation, whatever the version.

    `own_parent`: the parent directories are corral's own (`/corral`), to be removed once
    empty, whichever container made them.

    A plain base class rather than a typing.Protocol: importing typing would cost every
    `corral` command ~4 ms.
    """

    version = 0
    own_parent = False

    def create(self) -> None:
        """Make the container's directories (recording which ones corral made)."""
        raise NotImplementedError

    def add_pid(self, pid: int) -> None:
        """Move a process into the container's cgroup(s)."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Every process in the container's cgroup."""
        raise NotImplementedError

    def frozen(self) -> bool:
        """True while the cgroup is frozen (paused)."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Remove the directories corral made, and nothing else."""
        raise NotImplementedError

    def to_state(self) -> dict[str, Any]:
        """What state.json keeps to rebuild this manager."""
        raise NotImplementedError

    def dir_for(self, controller: str) -> str | None:
        """The container's directory that holds `controller`'s files, if the host has it."""
        raise NotImplementedError

    def plan(self, res: dict[str, Any]) -> list[Write]:
        """The writes `res` needs on this host (see _resources.plan)."""
        return plan(res, self.version)

    def apply(self, res: dict[str, Any], devices: list[dict[str, Any]] | None = None,
              with_devices: bool = True) -> None:
        """Apply `linux.resources`: all of it, or (on error) none of it.

        Every file is checked before the first write; the old values are read, and if a
        write fails the ones already made are restored in reverse order.

        Raises:
            CorralError: naming the config field whose value could not be applied.
        """
        writes = self.plan(res)
        rules = device_rules(res, devices) if with_devices and "devices" in res else None
        targets: list[tuple[Write, str]] = []
        for w in writes:
            d = self.dir_for(w.controller)
            if d is None:
                raise CorralError(f"{w.field}: the {w.controller} cgroup controller is not "
                                  "available on this host")
            path = os.path.join(d, w.file)
            if not os.path.exists(path):
                raise CorralError(f"{w.field}: {w.file} does not exist on this host (is the "
                                  f"{w.controller} controller or feature enabled?)")
            targets.append((w, path))
        targets = self._order(targets)
        done: list[tuple[str, str]] = []
        try:
            for w, path in targets:
                old = _read(path)
                value = w.value
                if "$keep" in value:  # cpu.max: keep the half that was not given
                    cur = old.split()
                    parts = value.split()
                    value = " ".join(cur[i] if parts[i] == "$keep" else parts[i]
                                     for i in range(2))
                try:
                    _write(path, value)
                except OSError as e:
                    raise CorralError(f"{w.field}: cannot write {value!r} to {path}: "
                                      f"{e.strerror}") from None
                done.append((path, old))
            if rules is not None:
                self.set_devices(rules)
        except BaseException:
            for path, old in reversed(done):
                for line in old.splitlines() or [old]:
                    try:
                        _write(path, line)
                    except OSError:
                        pass  # best effort: keyed files cannot always be restored
            raise

    def _order(self, targets: list[tuple[Write, str]]) -> list[tuple[Write, str]]:
        return targets

    def set_devices(self, rules: list[dict[str, Any]]) -> None:
        """Replace the container's device access rules."""
        raise NotImplementedError

    def freeze(self) -> None:
        """Freeze every process of the container; return once the kernel says frozen."""
        raise NotImplementedError

    def thaw(self) -> None:
        """Undo freeze()."""
        raise NotImplementedError


def _read(path: str) -> str:
    return _slurp(path).strip()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _wait_for(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not check():
        if time.monotonic() > deadline:
            raise CorralError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _limit_value(v: str) -> int:
    return 2**63 if v in ("-1", "max") else int(v)


class V1Manager(Manager):
    """cgroup v1 (and hybrid): one directory per mounted hierarchy."""

    version = 1

    def __init__(self, paths: dict[str, str], mounts: dict[str, str],
                 created: list[str] | None = None, unified: str | None = None) -> None:
        self.paths = paths  # hierarchy key -> container directory
        self.mounts = mounts  # hierarchy key -> mountpoint
        self.created = created if created is not None else []
        self.unified = unified  # hybrid: the container's directory in the cgroup2 tree

    @staticmethod
    def _fill_cpuset(d: str, mountpoint: str) -> None:
        """Copy cpus/mems down every level of `d` that has none, from the top.

        A new v1 cpuset starts empty and refuses tasks (ENOSPC) until cpus and mems are
        copied down from its parent. Every level is checked, not only the ones this call
        made: a concurrent create may have made a shared parent (`/corral`) and not yet
        filled it.
        """
        rel = os.path.relpath(d, mountpoint).split("/")
        for i in range(1, len(rel) + 1):
            level = os.path.join(mountpoint, *rel[:i])
            parent = os.path.dirname(level)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if _read(os.path.join(level, name)):
                    continue
                _write(os.path.join(level, name), _read(os.path.join(parent, name)))

    def create(self) -> None:
        for key, d in self.paths.items():
            _mkdirs(d, self.mounts[key], self.created)
            if "cpuset" in key.split(","):
                self._fill_cpuset(d, self.mounts[key])
        if self.unified:
            _mkdirs(self.unified, os.path.join(CGROUP_ROOT, "unified"), self.created)

    def add_pid(self, pid: int) -> None:
        for d in [*self.paths.values(), *([self.unified] if self.unified else [])]:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        for key in ("pids", "memory", "devices", "freezer"):
            if key in self.paths:
                return _read_pids(self.paths[key])
        return _read_pids(next(iter(self.paths.values()))) if self.paths else []

    def frozen(self) -> bool:
        d = self.paths.get("freezer")
        if not d:
            return False
        try:
            with open(os.path.join(d, "freezer.state")) as f:
                return f.read().strip() == "FROZEN"
        except FileNotFoundError:
            return False

    def destroy(self) -> None:
        dirs = [*self.paths.values(), *([self.unified] if self.unified else [])]
        parents = [os.path.dirname(d) for d in dirs] if self.own_parent else []
        _rmdirs(self.created + [p for p in parents if p not in self.created])

    def to_state(self) -> dict[str, Any]:
        return {"version": 1, "paths": self.paths, "mounts": self.mounts,
                "created": self.created, "unified": self.unified,
                "own_parent": self.own_parent}

    def dir_for(self, controller: str) -> str | None:
        for key, d in self.paths.items():
            if controller in key.split(","):
                return d
        if self.unified and controller in _unified_controllers(self.unified):
            return self.unified  # hybrid: a controller only the cgroup2 tree has (hugetlb)
        return None

    def _v2_only(self, res: dict[str, Any]) -> dict[str, str]:
        """Resource keys whose controller this hybrid host has in the cgroup2 tree only."""
        if not self.unified:
            return {}
        root = os.path.join(CGROUP_ROOT, "unified")
        return {k: c for k, c in (("hugepageLimits", "hugetlb"), ("rdma", "rdma"))
                if res.get(k) and not any(c in key.split(",") for key in self.paths)
                and c in _unified_controllers(root)}

    def plan(self, res: dict[str, Any]) -> list[Write]:
        v2 = self._v2_only(res)
        writes = plan({k: v for k, v in res.items() if k not in v2}, 1)
        if v2:
            writes += plan({k: res[k] for k in v2}, 2)
        return writes

    def apply(self, res: dict[str, Any], devices: list[dict[str, Any]] | None = None,
              with_devices: bool = True) -> None:
        v2 = self._v2_only(res)
        if v2 and self.unified:
            # Delegate those controllers down the cgroup2 tree to the container, only when a
            # limit asks for them (the host's tree is otherwise left as it is).
            root = os.path.join(CGROUP_ROOT, "unified")
            rel = os.path.relpath(self.unified, root).split("/")
            for i in range(len(rel)):
                parent = os.path.join(root, *rel[:i])
                _write(os.path.join(parent, "cgroup.subtree_control"),
                       " ".join("+" + c for c in v2.values()))
        super().apply(res, devices, with_devices)

    def _order(self, targets: list[tuple[Write, str]]) -> list[tuple[Write, str]]:
        # memory.memsw.limit_in_bytes must stay >= memory.limit_in_bytes at every step: when
        # the new memory limit is above the current memory+swap limit, raise memsw first.
        names = [w.file for w, _ in targets]
        if "memory.limit_in_bytes" in names and "memory.memsw.limit_in_bytes" in names:
            lim = next(t for t in targets if t[0].file == "memory.limit_in_bytes")
            sw = next(t for t in targets if t[0].file == "memory.memsw.limit_in_bytes")
            if _limit_value(lim[0].value) > _limit_value(_read(sw[1])):
                rest = [t for t in targets if t is not sw]
                return [sw, *rest]
        return targets

    def set_devices(self, rules: list[dict[str, Any]]) -> None:
        d = self.dir_for("devices")
        if d is None:
            raise CorralError("linux.resources.devices: the devices cgroup controller is not "
                              "available on this host")
        old = _read(os.path.join(d, "devices.list")).splitlines()
        fds: dict[bool, int] = {}  # one open file per kind: the kernel takes a rule per write
        try:
            for r in rules:
                kind = bool(r["allow"])
                if kind not in fds:
                    fds[kind] = os.open(os.path.join(d, "devices.allow" if kind else
                                                     "devices.deny"), os.O_WRONLY | os.O_CLOEXEC)
                os.write(fds[kind], v1_device_line(r).encode())
        except OSError as e:
            _write(os.path.join(d, "devices.deny"), "a")
            for line in old:
                try:
                    _write(os.path.join(d, "devices.allow"), line)
                except OSError:
                    pass
            raise CorralError(f"linux.resources.devices: {e.strerror}") from None
        finally:
            for fd in fds.values():
                os.close(fd)

    def freeze(self) -> None:
        d = self.dir_for("freezer")
        if d is None:
            raise CorralError("pause needs the freezer cgroup controller, which this host lacks")
        state = os.path.join(d, "freezer.state")

        def frozen() -> bool:
            if _read(state) == "FROZEN":
                return True
            _write(state, "FROZEN")  # a task that forked meanwhile: ask again
            return False

        _write(state, "FROZEN")
        _wait_for(frozen, "the freezer to report FROZEN")

    def thaw(self) -> None:
        d = self.dir_for("freezer")
        if d is None:
            return
        state = os.path.join(d, "freezer.state")
        _write(state, "THAWED")
        _wait_for(lambda: _read(state) == "THAWED", "the freezer to report THAWED")


class V2Manager(Manager):
    """cgroup v2: one directory in the unified tree, controllers enabled along its path."""

    version = 2

    def __init__(self, path: str, created: list[str] | None = None) -> None:
        self.path = path
        self.created = created if created is not None else []

    @staticmethod
    def _enable_controllers(d: str) -> None:
        # Delegate every available controller from the parent down to this new level, so
        # that limits can be set on the container's directory.
        parent = os.path.dirname(d)
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                ctrls = f.read().split()
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
        except FileNotFoundError:
            return
        missing = [c for c in ctrls if c not in enabled]
        if missing:
            try:
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join("+" + c for c in missing))
            except OSError as e:
                if e.errno != errno.EBUSY:  # a parent with processes of its own
                    raise

    def create(self) -> None:
        def on_new(d: str) -> None:
            self._enable_controllers(d)

        # Enable controllers from the top down for directories that already existed, too.
        _mkdirs(self.path, CGROUP_ROOT, self.created, on_new)

    def add_pid(self, pid: int) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        return _read_pids(self.path)

    def frozen(self) -> bool:
        try:
            with open(os.path.join(self.path, "cgroup.freeze")) as f:
                return f.read().strip() == "1"
        except FileNotFoundError:
            return False

    def destroy(self) -> None:
        parent = os.path.dirname(self.path)
        extra = [parent] if self.own_parent and parent not in self.created else []
        _rmdirs(self.created + extra)

    def to_state(self) -> dict[str, Any]:
        return {"version": 2, "path": self.path, "created": self.created,
                "own_parent": self.own_parent}

    def dir_for(self, controller: str) -> str | None:
        if controller in _unified_controllers(self.path):
            return self.path
        return None

    def set_devices(self, rules: list[dict[str, Any]]) -> None:
        # cgroup v2 has no devices files: the rules become an eBPF program on the cgroup.
        from ._bpf import set_device_rules

        set_device_rules(self.path, rules)

    def _frozen_is(self, want: str) -> bool:
        with open(os.path.join(self.path, "cgroup.events")) as f:
            for line in f:
                if line.startswith("frozen "):
                    return line.split()[1] == want
        return False

    def freeze(self) -> None:
        _write(os.path.join(self.path, "cgroup.freeze"), "1")
        _wait_for(lambda: self._frozen_is("1"), "cgroup.events to report frozen 1")

    def thaw(self) -> None:
        _write(os.path.join(self.path, "cgroup.freeze"), "0")
        _wait_for(lambda: self._frozen_is("0"), "cgroup.events to report frozen 0")


def _unified_controllers(d: str) -> list[str]:
    """The controllers a cgroup2 directory offers (enabled by its parent)."""
    try:
        with open(os.path.join(d, "cgroup.controllers")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def check_systemd_path(cgroups_path: str) -> None:
    """`--systemd-cgroup`: accept runc's `slice:prefix:name`, then say why it cannot be used.

    The systemd driver asks systemd (over D-Bus) for a transient scope; without a running
    systemd there is nobody to ask, and corral does not implement the D-Bus side yet.

    Raises:
        CorralError: always; naming the malformed path, or the reason.
    """
    if cgroups_path:
        parts = cgroups_path.split(":")
        if len(parts) != 3 or not parts[2] or (parts[0] and not parts[0].endswith(".slice")):
            from ._errors import ConfigError

            raise ConfigError("linux.cgroupsPath", f"{cgroups_path!r}: with --systemd-cgroup it "
                              "must be slice:prefix:name (e.g. system.slice:corral:ID)")
    if not os.path.isdir("/run/systemd/system"):
        raise CorralError("--systemd-cgroup: systemd is not running on this host (no "
                          "/run/systemd/system); run without --systemd-cgroup to use cgroupfs")
    raise CorralError("--systemd-cgroup: the systemd cgroup driver is not supported yet; run "
                      "without --systemd-cgroup to use cgroupfs")


def validate_cgroups_path(value: str, field: str = "linux.cgroupsPath") -> str:
    """Refuse paths with `..` components: a container's cgroup must not climb out."""
    if ".." in value.split("/"):
        from ._errors import ConfigError

        raise ConfigError(field, f"{value!r} must not contain '..'")
    return value


def new_manager(cgroups_path: str | None, cid: str, systemd: bool = False) -> Manager:
    """The manager for a new container placed at `cgroups_path` (default `/corral/<id>`)."""
    if systemd:
        check_systemd_path(cgroups_path or "")
    path = validate_cgroups_path(cgroups_path) if cgroups_path else f"/corral/{cid}"
    hs = hierarchies()
    own = own_cgroups()
    mgr: Manager
    if any(h.version == 2 and h.mountpoint == CGROUP_ROOT for h in hs):
        h2 = next(h for h in hs if h.mountpoint == CGROUP_ROOT)
        mgr = V2Manager(_rel(CGROUP_ROOT, own.get("", "/"), h2.mount_root, path))
    else:
        mgr = _new_v1(hs, own, path)
    if not cgroups_path:
        # `/corral` is corral's own parent, shared by every container placed by default:
        # whichever container is deleted last removes it (rmdir of a busy one just fails).
        mgr.own_parent = True
    return mgr


def _new_v1(hs: list[Hierarchy], own: dict[str, str], path: str) -> Manager:
    v1 = [h for h in hs if h.version == 1]
    if not v1:
        raise CorralError("no cgroup filesystem is mounted under /sys/fs/cgroup")
    paths: dict[str, str] = {}
    mounts: dict[str, str] = {}
    for h in v1:
        key = h.name
        paths[key] = _rel(h.mountpoint, own.get(key, "/"), h.mount_root, path)
        mounts[key] = h.mountpoint
    unified = None
    uni = [h for h in hs if h.version == 2 and h.mountpoint == CGROUP_ROOT + "/unified"]
    if uni:
        unified = _rel(uni[0].mountpoint, own.get("", "/"), uni[0].mount_root, path)
    return V1Manager(paths, mounts, unified=unified)


def manager_from_state(data: dict[str, Any]) -> Manager:
    """Rebuild a container's manager from what `to_state` saved."""
    mgr: Manager
    if data.get("version") == 2:
        mgr = V2Manager(data["path"], list(data.get("created", [])))
    else:
        mgr = V1Manager(dict(data["paths"]), dict(data["mounts"]),
                        list(data.get("created", [])), data.get("unified"))
    mgr.own_parent = bool(data.get("own_parent"))
    return mgr
