"""Shared fixtures for the corral runtime tests.

The runtime under test is the binary named by CORRAL_TEST_RUNTIME (default: the `corral`
console script next to the running interpreter).  Every test gets its own state root
(`--root`) and bundle directories under pytest's tmp dir, a shared read-only busybox rootfs,
and a teardown that force-deletes what the test created and then fails the test if anything
(state entry, mount, cgroup, process) is left behind.

The pytest process is a child subreaper: detached container inits are reparented to it when
the runtime process exits, and a daemon thread reaps them (the machine's PID 1 does not).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_ROOTFS = REPO / "scripts" / "build-rootfs"
RUNTIME: str = os.environ.get("CORRAL_TEST_RUNTIME") or str(Path(sys.executable).parent / "corral")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_SEARCH_DEPTH = 4
PR_SET_CHILD_SUBREAPER = 36
MNT_DETACH = 2

Config = dict[str, Any]
ConfigChanges = Mapping[str, Any] | Callable[[Config], object] | None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------
# Subprocesses and orphan reaping
# --------------------------------------------------------------------------------------------

_SPAWN_LOCK = threading.Lock()
_TRACKED: set[int] = set()
_reaper_started = False


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a subprocess; its pid is tracked so that the reaper never steals its status."""
    with _SPAWN_LOCK:
        proc = subprocess.Popen(list(argv), **kwargs)
        _TRACKED.add(proc.pid)
    return proc


def wait_tracked(proc: subprocess.Popen[bytes], timeout: float | None) -> int:
    """Wait for a process started by spawn(); on timeout kill it (by pid) and re-raise."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.returncode is not None:
            with _SPAWN_LOCK:
                _TRACKED.discard(proc.pid)


def run_cmd(
    argv: Sequence[str],
    *,
    input: str | bytes | None = None,
    timeout: float = 30.0,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured in files rather than pipes.

    Files, not pipes: a container started by `create` or `run --detach` inherits the runtime's
    stdio and would hold a pipe open long after the runtime itself has exited.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryFile() as inp,
    ):
        if input is not None:
            inp.write(input.encode() if isinstance(input, str) else input)
            inp.seek(0)
        proc = spawn(
            argv,
            stdin=inp,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=dict(env) if env is not None else _child_env(),
            pass_fds=tuple(pass_fds),
        )
        rc = wait_tracked(proc, timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            list(argv),
            rc,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # runc passes $LISTEN_FDS fds on to the container; none of ours should leak that way.
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    return env


def _zombie_children() -> list[int]:
    """Pids of our own zombie children, found through /proc (waitid reports only one)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] == "Z" and int(fields[1]) == me:
            found.append(int(entry))
    return found


def reap_orphans() -> None:
    """Reap every exited child that no spawn() caller is going to wait for."""
    with _SPAWN_LOCK:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        if info.si_pid not in _TRACKED:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            return
        # The first waitable child is a tracked one that its owner will wait for: other
        # orphans may be hiding behind it, so look for them by pid.
        for pid in _zombie_children():
            if pid not in _TRACKED:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


def _reaper_loop() -> None:
    while True:
        try:
            reap_orphans()
        except Exception as exc:  # never let the reaper die silently
            print(f"corral tests: reaper error: {exc!r}", file=sys.stderr)
        time.sleep(0.05)


def _start_reaper() -> None:
    global _reaper_started
    if _reaper_started:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    threading.Thread(target=_reaper_loop, name="orphan-reaper", daemon=True).start()
    _reaper_started = True


# --------------------------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    _start_reaper()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        if in_ci():
            pytest.fail("test marked root must run as root in CI, but euid != 0")
        pytest.skip("needs root")


def pytest_report_header(config: pytest.Config) -> str:
    return f"corral runtime under test: {RUNTIME}"


# --------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------


def deep_merge(base: Config, changes: Mapping[str, Any]) -> Config:
    """Merge changes into base in place: dicts recursively, anything else replaced."""
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def apply_changes(config: Config, changes: ConfigChanges) -> None:
    if changes is None:
        return
    if callable(changes):
        changes(config)
    else:
        deep_merge(config, changes)


class Bundle:
    """A bundle directory with its config.json held as a dict."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = path
        self.config = config

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def write(self) -> Bundle:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        return self

    def modify(self, changes: ConfigChanges) -> Bundle:
        apply_changes(self.config, changes)
        return self.write()

    def set_args(self, *args: str) -> Bundle:
        self.config["process"]["args"] = list(args)
        return self.write()

    def __str__(self) -> str:
        return str(self.path)


# --------------------------------------------------------------------------------------------
# Runtime runner
# --------------------------------------------------------------------------------------------

_CONTAINER_CREATING = ("create", "run")


class RuntimeFailed(AssertionError):
    pass


class Runtime:
    """Runs the runtime under test with a per-test --root and records container ids."""

    def __init__(self, binary: str, state_root: Path, tmp_path: Path, rootfs: Path) -> None:
        self.binary = binary
        self.state_root = state_root
        self.tmp_path = tmp_path
        self.rootfs = rootfs
        self.ids: list[str] = []
        self._bundles = 0

    # -- ids ---------------------------------------------------------------------------------
    def new_id(self) -> str:
        cid = "t-" + uuid.uuid4().hex[:10]
        self.ids.append(cid)
        return cid

    def record(self, cid: str) -> None:
        if cid not in self.ids:
            self.ids.append(cid)

    @property
    def generated_ids(self) -> list[str]:
        """Ids that are unique enough to search for in cgroups and command lines."""
        return [i for i in self.ids if i.startswith("t-") and len(i) == 12]

    # -- running -----------------------------------------------------------------------------
    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        return [self.binary, "--root", str(self.state_root), *map(str, args)]

    def __call__(
        self,
        *args: str | os.PathLike[str],
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 30.0,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.CompletedProcess[str]:
        sargs = [str(a) for a in args]
        if len(sargs) > 1 and sargs[0] in _CONTAINER_CREATING and not sargs[-1].startswith("-"):
            self.record(sargs[-1])
        return self.raw(
            self.argv(*sargs),
            input=input,
            check=check,
            timeout=timeout,
            cwd=cwd,
            pass_fds=pass_fds,
        )

    def raw(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 30.0,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run an arbitrary argv (e.g. a shell wrapper around self.argv(...))."""
        res = run_cmd(argv, input=input, timeout=timeout, cwd=cwd, pass_fds=pass_fds)
        if check and res.returncode != 0:
            raise RuntimeFailed(
                f"command failed with exit status {res.returncode}: {argv}\n"
                f"--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"
            )
        return res

    # -- conveniences ------------------------------------------------------------------------
    def state(self, cid: str) -> dict[str, Any]:
        res = self("state", cid)
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def status(self, cid: str) -> str | None:
        res = self("state", cid, check=False)
        if res.returncode != 0:
            return None
        status: str = json.loads(res.stdout)["status"]
        return status

    def wait_status(self, cid: str, want: str, timeout: float = 5.0) -> str | None:
        """Poll `state` until the status is `want` (or the timeout passes); return the last."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.status(cid)
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def leftovers(self) -> list[str]:
        """What find_leftovers() would report right now (without deleting anything first)."""
        return find_leftovers(self, self.rootfs)

    def make_bundle(self, args: Sequence[str] = ("true",), changes: ConfigChanges = None) -> Bundle:
        """A new bundle: `spec` output, then terminal off, args set, the shared rootfs read-only,
        and finally `changes` (a dict deep-merged into the config, or a callable editing it)."""
        path = self.tmp_path / f"bundle{self._bundles}"
        self._bundles += 1
        path.mkdir()
        self("spec", "--bundle", path, cwd=path)
        config: Config = json.loads((path / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = list(args)
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        apply_changes(config, changes)
        return Bundle(path, config).write()

    def create(self, bundle: Bundle, *extra: str, cid: str | None = None) -> str:
        cid = cid or self.new_id()
        self("create", "--bundle", bundle.path, *extra, cid)
        return cid

    def run_container(
        self,
        config_changes: ConfigChanges = None,
        args: Sequence[str] = ("true",),
        *,
        extra: Sequence[str] = (),
        input: str | bytes | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, str, str]:
        """`run` a fresh container in a fresh bundle; return (exit status, stdout, stderr)."""
        bundle = self.make_bundle(args=args, changes=config_changes)
        cid = self.new_id()
        res = self(
            "run", "--bundle", bundle.path, *extra, cid, input=input, check=False, timeout=timeout
        )
        return res.returncode, res.stdout, res.stderr


# --------------------------------------------------------------------------------------------
# Leftover detection
# --------------------------------------------------------------------------------------------


def _unescape_mountinfo(s: str) -> str:
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def mounts_under(prefixes: Sequence[Path]) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            for prefix in prefixes:
                p = str(prefix)
                if point == p or point.startswith(p + "/"):
                    found.append(point)
    return found


def cgroups_named(ids: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    if not ids or not CGROUP_ROOT.is_dir():
        return found

    def walk(d: Path, depth: int) -> None:
        if depth > CGROUP_SEARCH_DEPTH:
            return
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                continue
            if any(i in e.name for i in ids):
                found.append(Path(e.path))
            walk(Path(e.path), depth + 1)

    for ctrl in sorted(CGROUP_ROOT.iterdir()):
        if ctrl.is_dir() and not ctrl.is_symlink():
            # On pure v2 the top-level directories are cgroups themselves.
            if any(i in ctrl.name for i in ids):
                found.append(ctrl)
            walk(ctrl, 1)
    return found


def processes_of(ids: Sequence[str], rootfs: Path) -> dict[int, str]:
    """Live processes whose command line names one of ids or whose root is the test rootfs."""
    root_st = rootfs.stat()
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = (
                Path(f"/proc/{entry}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .strip()
            )
        except OSError:
            continue
        if not cmdline:  # zombies and kernel threads
            continue
        hit = any(i in cmdline for i in ids)
        if not hit:
            try:
                st = os.stat(f"/proc/{entry}/root")
                hit = (st.st_dev, st.st_ino) == (root_st.st_dev, root_st.st_ino)
            except OSError:
                pass
        if hit:
            found[int(entry)] = cmdline
    return found


def _umount_lazy(path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.umount2(path.encode(), MNT_DETACH)


def _remove_cgroup(path: Path) -> None:
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            _kill_cgroup_procs(sub)
            with contextlib.suppress(OSError):
                sub.rmdir()
    _kill_cgroup_procs(path)
    with contextlib.suppress(OSError):
        path.rmdir()


def _kill_cgroup_procs(path: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)


def _searchable_ids(rt: Runtime) -> list[str]:
    """Generated ids plus any (long enough) names still in the state root."""
    ids = list(rt.generated_ids)
    with contextlib.suppress(OSError):
        ids += [n for n in os.listdir(rt.state_root) if len(n) >= 8 and n not in ids]
    return ids


def find_leftovers(rt: Runtime, rootfs: Path) -> list[str]:
    problems: list[str] = []
    if rt.state_root.exists():
        entries = sorted(os.listdir(rt.state_root))
        if entries:
            problems.append(f"state root {rt.state_root} still holds {entries}")
    mounts = mounts_under([rt.tmp_path, rootfs])
    if mounts:
        problems.append(f"mounts left behind: {mounts}")
    ids = _searchable_ids(rt)
    groups = cgroups_named(ids)
    if groups:
        problems.append(f"cgroups left behind: {[str(g) for g in groups]}")
    procs = processes_of(ids, rootfs)
    if procs:
        problems.append(f"processes left behind: {procs}")
    return problems


def clean_leftovers(rt: Runtime, rootfs: Path) -> None:
    ids = _searchable_ids(rt)
    for name in os.listdir(rt.state_root) if rt.state_root.exists() else []:
        with contextlib.suppress(Exception):
            run_cmd(rt.argv("delete", "--force", name), timeout=15)
    for pid in processes_of(ids, rootfs):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for point in sorted(mounts_under([rt.tmp_path, rootfs]), key=len, reverse=True):
        _umount_lazy(point)
    time.sleep(0.2)
    for group in cgroups_named(ids):
        _remove_cgroup(group)
    if rt.state_root.exists():
        for entry in rt.state_root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                for sub in sorted(entry.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        sub.rmdir() if sub.is_dir() and not sub.is_symlink() else sub.unlink()
                with contextlib.suppress(OSError):
                    entry.rmdir()
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def runtime_binary() -> str:
    return RUNTIME


@pytest.fixture(scope="session")
def is_runc() -> bool:
    """True when the runtime under test is runc (the reference the suite is validated on).

    Requirements that go beyond runc (e.g. naming the id in every error message) are only
    enforced when this is False.
    """
    if Path(RUNTIME).name == "runc":
        return True
    with contextlib.suppress(Exception):
        res = run_cmd([RUNTIME, "--version"], timeout=10)
        return res.stdout.startswith("runc version")
    return False


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem, built once per session and shared read-only."""
    base = tmp_path_factory.mktemp("rootfs")
    path = base / "rootfs"
    res = run_cmd(["/bin/sh", str(BUILD_ROOTFS), str(path)], timeout=120)
    assert res.returncode == 0, f"build-rootfs failed:\n{res.stdout}\n{res.stderr}"
    # pytest makes its tmp dirs 0700; a container whose root maps to an unprivileged host uid
    # (user namespaces) must still be able to walk down to its rootfs.
    for d in (base, base.parent, base.parent.parent):
        if d != Path(tempfile.gettempdir()) and d.is_dir():
            d.chmod(d.stat().st_mode | 0o111)
    return path


@pytest.fixture
def state_root(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def rt(state_root: Path, tmp_path: Path, rootfs: Path) -> Iterator[Runtime]:
    runtime = Runtime(RUNTIME, state_root, tmp_path, rootfs)
    yield runtime
    # Teardown: delete what is left, give the reaper a moment, then look for leftovers.
    for cid in list(runtime.ids):
        with contextlib.suppress(Exception):
            run_cmd(runtime.argv("delete", "--force", cid), timeout=15)
    deadline = time.monotonic() + 5.0
    problems = find_leftovers(runtime, rootfs)
    while problems and time.monotonic() < deadline:
        time.sleep(0.1)
        problems = find_leftovers(runtime, rootfs)
    if problems:
        clean_leftovers(runtime, rootfs)
        pytest.fail("test left things behind:\n  " + "\n  ".join(problems))


@pytest.fixture
def make_bundle(rt: Runtime) -> Callable[..., Bundle]:
    """Factory: make_bundle(args=[...], changes={...} or callable) -> Bundle."""
    return rt.make_bundle


@pytest.fixture
def bundle(make_bundle: Callable[..., Bundle]) -> Bundle:
    return make_bundle()


@pytest.fixture
def writable_tmp() -> Callable[[Config], None]:
    """Adds a writable 1 MiB tmpfs on /tmp to a config (the shared rootfs is read-only)."""

    def add(config: Config) -> None:
        config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                                 "options": ["nosuid", "nodev", "mode=1777", "size=1m"]})

    return add


@pytest.fixture
def cf() -> Any:
    """This module (spawn, wait_tracked, run_cmd, cgroups_named, ...) for tests that need its
    helpers: with --import-mode=importlib a test module cannot `import conftest`."""
    return sys.modules[__name__]


@pytest.fixture
def host_ns() -> Callable[[str], str]:
    """readlink of the test process's own namespace of a type, e.g. host_ns("net")."""
    return lambda kind: os.readlink(f"/proc/self/ns/{kind}")


# --------------------------------------------------------------------------------------------
# corrald under test (tests/test_daemon.py and the other daemon tests)
# --------------------------------------------------------------------------------------------

DAEMON_TIMEOUT = 20.0


class Corrald:
    """One corrald subprocess and its files."""

    def __init__(self, rt: Runtime, tmp: Path, cf: Any) -> None:
        self.rt, self.cf = rt, cf
        self.conf = tmp / "containers.d"
        self.logs = tmp / "logs"
        self.ctl = tmp / "ctl"
        self.err = tmp / "corrald.err"
        self.conf.mkdir()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(tmp / "notify.sock"))
        self.notify_path = str(tmp / "notify.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.names: list[str] = []
        self.daemon_config: str | None = None  # corrald.toml's text for every start
        self._run_from = 0  # where the current daemon's part of `err` begins

    def add(self, command: str, *sections: str, memory: str | None = None) -> str:
        """Write a container file running ``sh -c COMMAND``; returns its name."""
        name = self.rt.new_id()
        self.names.append(name)
        argv = json.dumps(["sh", "-c", command])
        text = f'[container]\nrootfs = "{self.rt.rootfs}"\ncommand = {argv}\n'
        if memory:
            text += f'[resources]\nmemory = "{memory}"\n'
        text += "".join(s.strip() + "\n" for s in sections)
        (self.conf / f"{name}.toml").write_text(text)
        return name

    def add_as(self, name: str, command: str, *sections: str) -> None:
        """Rewrite container `name`'s file with another command (for reload tests)."""
        argv = json.dumps(["sh", "-c", command])
        text = f'[container]\nrootfs = "{self.rt.rootfs}"\ncommand = {argv}\n'
        text += "".join(s.strip() + "\n" for s in sections)
        (self.conf / f"{name}.toml").write_text(text)

    def start(self, env: Mapping[str, str] | None = None, wait_ready: bool = True,
              daemon_config: str | None = None) -> None:
        """Start corrald (again: its stderr is appended to `err`) and wait for READY=1.

        `env` is added to the environment (e.g. CORRALD_FAULT); `daemon_config` is the text
        of a corrald.toml to pass with --config (default: the `daemon_config` attribute)."""
        daemon_config = daemon_config if daemon_config is not None else self.daemon_config
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, **(env or {})}
        argv = [sys.executable, "-m", "corral.supervisor._main", "--config-dir", str(self.conf),
                "--root", str(self.rt.state_root), "--log-dir", str(self.logs),
                "--socket", str(self.ctl / "corrald.sock")]
        if daemon_config is not None:
            path = self.conf.parent / "corrald.toml"
            path.write_text(daemon_config)
            argv += ["--config", str(path)]
        self.notify.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # what an earlier daemon sent (a READY=1 after a reload) is stale
                self.notify.recv(4096)
        self._run_from = self.err.stat().st_size if self.err.exists() else 0
        with open(self.err, "ab") as err:
            self.proc = self.cf.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err, env=env, cwd="/")
        if not wait_ready:
            return
        self.notify.settimeout(DAEMON_TIMEOUT)
        while True:
            msg = self.notify.recv(4096).decode()
            if "READY=1" in msg:
                assert "STATUS=" in msg
                return

    def kill9(self) -> None:
        """SIGKILL the daemon (a crash) and reap it."""
        assert self.proc is not None
        self.proc.kill()
        self.cf.wait_tracked(self.proc, DAEMON_TIMEOUT)

    def helper_pids(self) -> list[int]:
        """Every namespace helper pid any of the daemons started so far logged."""
        text = self.text if self.err.exists() else ""
        return sorted({int(p) for p in re.findall(r"namespace helper \(?pid (\d+)", text)})

    @property
    def text(self) -> str:
        return self.err.read_text(errors="replace")

    @property
    def run_text(self) -> str:
        """What the current (last started) daemon wrote."""
        with open(self.err, "rb") as f:
            f.seek(self._run_from)
            return f.read().decode(errors="replace")

    def log_of(self, name: str) -> str:
        """Container `name`'s log file, or "" before it exists."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, pattern: str, timeout: float = DAEMON_TIMEOUT,
                 source: Callable[[], str] | None = None) -> re.Match[str]:
        """The first match of `pattern` in corrald's stderr (all runs), or in `source()`."""
        read = source or (lambda: self.text)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, read())
            if m:
                return m
            if source is None and self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.02)
        pytest.fail(f"no {pattern!r} in {'corrald' if source is None else 'the source'}:\n"
                    f"{read()}\n--- corrald:\n{self.text}")

    def terminate(self, timeout: float = DAEMON_TIMEOUT) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return int(self.cf.wait_tracked(self.proc, timeout))

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cf.wait_tracked(self.proc, 0.01)
        for name in self.names:
            with contextlib.suppress(Exception):
                self.cf.run_cmd(self.rt.argv("delete", "--force", name), timeout=15)
        for pid in self.helper_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for d in ("bundles", "corrald"):
            if (self.rt.state_root / d).exists():
                subprocess.run(["rm", "-rf", str(self.rt.state_root / d)], check=False)
        self.notify.close()


@pytest.fixture
def corrald(rt: Runtime, tmp_path: Path, cf: Any) -> Iterator[Corrald]:
    d = Corrald(rt, tmp_path, cf)
    try:
        yield d
    finally:
        d.cleanup()
