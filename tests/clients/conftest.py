"""Fixtures for driving corral through real container engines: podman (with conmon) and
containerd (with its io.containerd.runc.v2 shim and `ctr`).

Everything an engine keeps lives in a dir of the test's own, /tmp/corral-{pm,cd}-XXXXXXXX (short:
podman refuses a run root over 50 characters): podman gets its own storage root, run root, tmp
dir, containers.conf, cgroup parent and corral state root; containerd is started by the fixture
with its own config, socket, root and state dirs and a namespace (so a cgroup parent) of its
own, and stopped at teardown. The engines call corral
through a small wrapper script that logs every argv (`Engine.calls()`), so that a failing test
shows what the engine asked of corral. Each fixture's teardown removes what the engine left and
then fails the test if anything was left: containers, corral state, mounts, cgroups, processes.

The tests need root, the Debian packages podman and containerd (`scripts/setup --clients`) and
no network: the image is made locally from the busybox rootfs of tests/conftest.py.
CORRAL_CLIENTS_LOG=FILE also appends every corral argv of the session to FILE.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CGROUP_ROOT = Path("/sys/fs/cgroup")
MNT_DETACH = 2
IMAGE = "localhost/corral-busybox:latest"
# Host paths an engine may create on its own however it is configured; the session removes
# the ones that did not exist before it.
HOST_PATHS = (
    "/var/lib/containers",  # podman's blob-info cache (not movable in podman 4.3)
    "/run/containerd",  # the shims' sockets (/run/containerd/s, fixed in containerd 1.6)
    "/var/lib/containerd",
    "/run/containers",
    "/run/libpod",
    "/run/netns",
    "/opt/containerd",
    "/dev/shm/libpod_lock",
)


def _base_conftest() -> ModuleType:
    """tests/conftest.py as pytest loaded it (under --import-mode=importlib its module name is
    not importable): its spawn() must be used, since its orphan reaper reaps any child whose
    pid spawn() does not track."""
    want = (Path(__file__).resolve().parent.parent / "conftest.py").resolve()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == want:
            return mod
    raise RuntimeError(f"{want} is not loaded")


_base = _base_conftest()
CORRAL: str = _base.RUNTIME


def in_ci() -> bool:
    return bool(_base.in_ci())


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"{', '.join(missing)} not installed (scripts/setup --clients installs them)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------


def run(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    input: str | bytes | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run to completion, output in files (containers may inherit and hold a pipe)."""
    return _base.run_cmd(argv, env=env, input=input, timeout=timeout)


def run_pty(argv: Sequence[str], *, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """Run with a pseudo-terminal as stdin, stdout and stderr; return (exit status, everything
    written to the terminal)."""
    master, slave = os.openpty()
    try:
        proc = _base.spawn(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([master], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError as e:  # EIO: every slave end is closed
                    if e.errno != errno.EIO:
                        raise
                    chunk = b""
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = _base.wait_tracked(proc, max(deadline - time.monotonic(), 1.0))
    finally:
        os.close(master)
    return rc, out.decode(errors="replace")


def wait_for(pred: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# The corral wrapper and leftovers
# --------------------------------------------------------------------------------------------


def write_wrapper(path: Path, log: Path, global_args: Sequence[str] = ()) -> Path:
    """A shell script that appends its argv to `log` (and $CORRAL_CLIENTS_LOG) and execs corral
    with `global_args` first."""
    extra = " ".join(_sh_quote(a) for a in global_args)
    session_log = os.environ.get("CORRAL_CLIENTS_LOG", "")
    tee = f'printf "%s\\n" "$*" >> {_sh_quote(session_log)}\n' if session_log else ""
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {_sh_quote(str(log))}\n'
        f"{tee}"
        f'exec {_sh_quote(CORRAL)} {extra} "$@"\n'
    )
    path.chmod(0o755)
    return path


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def mounts_under(prefix: Path) -> list[str]:
    return list(_base.mounts_under([prefix]))


def umount_under(prefix: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for point in sorted(mounts_under(prefix), key=len, reverse=True):
        libc.umount2(point.encode(), MNT_DETACH)


def cgroup_dirs(rel: str) -> list[Path]:
    """The directories of cgroup `rel` (e.g. "/corral-xyz") in every hierarchy."""
    rel = rel.strip("/")
    found = []
    if not CGROUP_ROOT.is_dir():
        return found
    direct = CGROUP_ROOT / rel
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # pure v2
        return [direct] if direct.is_dir() else []
    for ctrl in sorted(CGROUP_ROOT.iterdir()):
        d = ctrl / rel
        if not ctrl.is_symlink() and d.is_dir():
            found.append(d)
    return found


def cgroup_procs(rel: str) -> list[int]:
    pids: set[int] = set()
    for d in cgroup_dirs(rel):
        for f in d.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in f.read_text().split())
    return sorted(pids)


def remove_cgroup_tree(rel: str) -> None:
    """Kill what is left in cgroup `rel` and remove it, deepest first, in every hierarchy."""
    for pid in cgroup_procs(rel):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for d in cgroup_dirs(rel):
        subs = sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        for sub in [*reversed(subs), d]:
            for _ in range(50):
                try:
                    sub.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def processes_mentioning(needle: str) -> dict[int, str]:
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = (
                Path(f"/proc/{entry}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if needle in cmd:
            found[int(entry)] = cmd.strip()
    return found


def kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Engine:
    """What the podman and containerd helpers share: a private dir, an env, the argv log."""

    image = IMAGE
    wait_for = staticmethod(wait_for)

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.argv_log = base / "corral-argv.log"
        self.argv_log.touch()
        self.env = dict(_base._child_env())

    def calls(self) -> list[str]:
        """Every corral invocation so far (argv after the program name), in order."""
        return self.argv_log.read_text().splitlines()

    def describe(self) -> str:
        return "corral calls:\n  " + "\n  ".join(self.calls())

    def check(self, res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        if res.returncode != 0:
            raise AssertionError(
                f"exit status {res.returncode}: {res.args}\n--- stdout ---\n{res.stdout}"
                f"--- stderr ---\n{res.stderr}\n{self.describe()}"
            )
        return res


def short_tmp_dir(prefix: str) -> Path:
    """A new dir right under /tmp: podman refuses a run root longer than 50 characters, and a
    socket's path must fit in 108 bytes, which pytest's tmp_path can exceed."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_dir(path: Path) -> None:
    umount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def corral_state(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.is_dir() else []


def delete_corral_state(root: Path) -> None:
    for name in corral_state(root):
        with contextlib.suppress(Exception):
            run(
                [CORRAL, "--root", str(root), "delete", "--force", name],
                env=_base._child_env(),
                timeout=15,
            )


# --------------------------------------------------------------------------------------------
# Session: host paths
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def host_paths_guard() -> Iterator[None]:
    """Removes at the end of the session the host paths (HOST_PATHS) that the engines made."""
    before = {p for p in HOST_PATHS if os.path.lexists(p)}
    yield
    for p in HOST_PATHS:
        if p not in before and os.path.lexists(p):
            umount_under(Path(p))
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)


def image_tar(rootfs: Path, dest: Path) -> Path:
    """An uncompressed tarball of the busybox rootfs (what `podman import` reads)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(str(rootfs), arcname=".")
    return dest


def oci_archive(rootfs: Path, dest: Path, ref: str = IMAGE) -> Path:
    """An OCI image layout archive of the rootfs as one layer (what `ctr image import` reads);
    `io.containerd.image.name` gives containerd the image's name."""

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o644
        tf.addfile(ti, io.BytesIO(data))

    def blob(tf: tarfile.TarFile, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        add(tf, f"blobs/sha256/{digest}", data)
        return "sha256:" + digest

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as lt:
        lt.add(str(rootfs), arcname=".")
    layer = buf.getvalue()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    with tarfile.open(dest, "w") as tf:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
        layer_digest = blob(tf, layer)
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    "Cmd": ["sh"],
                },
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            }
        ).encode()
        config_digest = blob(tf, config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        manifest_digest = blob(tf, manifest)
        add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(
            tf,
            "index.json",
            json.dumps(
                {
                    "schemaVersion": 2,
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": manifest_digest,
                            "size": len(manifest),
                            "annotations": {
                                "io.containerd.image.name": ref,
                                "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
                            },
                        }
                    ],
                }
            ).encode(),
        )
    return dest


@pytest.fixture(scope="session")
def clients_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clients")


@pytest.fixture(scope="session")
def busybox_tar(rootfs: Path, clients_dir: Path) -> Path:
    return image_tar(rootfs, clients_dir / "busybox.tar")


@pytest.fixture(scope="session")
def busybox_oci(rootfs: Path, clients_dir: Path) -> Path:
    return oci_archive(rootfs, clients_dir / "busybox-oci.tar")


# --------------------------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------------------------


class Podman(Engine):
    """podman with a storage root, run root, tmp dir, containers.conf and cgroup parent of its
    own, and corral (through the logging wrapper, with a private --root) as its runtime."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.tag = "corral-podman-" + uuid.uuid4().hex[:8]
        self.cgroup_parent = "/" + self.tag
        self.state_root = base / "corral-state"
        self.storage = base / "storage"
        self.runroot = base / "runroot"
        self.tmpdir = base / "tmp"
        # podman passes corral no global flag (and drops --runtime-flag when conmon's exit
        # command cleans up), so the wrapper gives corral a state root of the test's own.
        self.wrapper = write_wrapper(
            base / "corral", self.argv_log, ["--root", str(self.state_root)]
        )
        conf = base / "containers.conf"
        conf.write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'  # no systemd on these machines
            'events_logger = "file"\n'
            f'events_logfile_path = "{base / "events.log"}"\n'
            'lock_type = "file"\n'  # not the host-wide /dev/shm/libpod_lock
            "[network]\n"
            f'network_config_dir = "{base / "networks"}"\n'
        )
        storage_conf = base / "storage.conf"
        storage_conf.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{self.runroot}"\n'
            f'graphroot = "{self.storage}"\n'
        )
        self.env["CONTAINERS_CONF"] = str(conf)
        self.env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
        self.env["TMPDIR"] = str(self.tmpdir)

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.storage),
            "--runroot",
            str(self.runroot),
            "--tmpdir",
            str(self.tmpdir),
            "--storage-driver",
            "overlay",
            "--runtime",
            str(self.wrapper),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]

    @property
    def run_opts(self) -> list[str]:
        """For every `podman run`/`create`: no network set-up, limits within this machine's
        bounding set (it lacks CAP_SYS_RESOURCE), the test's cgroup parent."""
        return [
            "--network",
            "none",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--cgroup-parent",
            self.cgroup_parent,
        ]

    def __call__(
        self,
        *args: str,
        input: str | bytes | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        res = run(self.argv(*args), env=self.env, input=input, timeout=timeout)
        return self.check(res) if check else res

    def tty(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        return run_pty(self.argv(*args), env=self.env, timeout=timeout)

    def run_detached(self, name: str, *cmd: str) -> str:
        return self("run", "-d", "--name", name, *self.run_opts, IMAGE, *cmd).stdout.strip()

    def inspect(self, name: str, fmt: str) -> str:
        return self("inspect", "--format", fmt, name).stdout.strip()

    def status(self, name: str) -> str:
        return self.inspect(name, "{{.State.Status}}")

    def container_ids(self) -> list[str]:
        res = self("ps", "-aq", "--no-trunc", check=False, timeout=30)
        return res.stdout.split() if res.returncode == 0 else []

    # -- teardown ----------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        problems = []
        if ids := self.container_ids():
            problems.append(f"podman containers: {ids}")
        if st := corral_state(self.state_root):
            problems.append(f"corral state in {self.state_root}: {st}")
        if m := mounts_under(self.dir):
            problems.append(f"mounts: {m}")
        if procs := cgroup_procs(self.cgroup_parent):
            problems.append(f"processes in {self.cgroup_parent}: {procs}")
        if procs2 := processes_mentioning(str(self.dir)):
            problems.append(f"processes: {procs2}")
        # corral removes a container's cgroup; podman leaves its parent and the conmon group
        # (podman's own behaviour, with runc too), which clean() removes.
        if cg := [
            str(p)
            for d in cgroup_dirs(self.cgroup_parent)
            for p in d.iterdir()
            if p.is_dir() and p.name != "conmon"
        ]:
            problems.append(f"cgroups: {cg}")
        return problems

    def clean(self) -> None:
        if self.container_ids():
            self("rm", "-af", "-t", "0", check=False, timeout=60)
        delete_corral_state(self.state_root)
        kill_pids(list(cgroup_procs(self.cgroup_parent)))
        kill_pids(list(processes_mentioning(str(self.dir))))
        umount_under(self.dir)
        remove_cgroup_tree(self.cgroup_parent)
        shutil.rmtree(self.storage, ignore_errors=True)


@pytest.fixture
def podman(busybox_tar: Path, host_paths_guard: None) -> Iterator[Podman]:
    need_tools("podman", "conmon")
    base = short_tmp_dir("corral-pm-")
    pm = Podman(base)
    try:
        with busybox_tar.open("rb") as f:
            pm.check(run(pm.argv("import", "-", IMAGE), env=pm.env, input=f.read()))
        yield pm
    finally:
        problems: list[str] = []
        try:
            # What the test left is removed through podman first (and so through corral).
            if pm.container_ids():
                pm("rm", "-af", "-t", "0", check=False, timeout=60)
            wait_for(lambda: not pm.leftovers(), 10.0, 0.1)
            problems = pm.leftovers()
        finally:
            pm.clean()
            after = [p for p in (mounts_under(base), cgroup_dirs(pm.cgroup_parent)) if p]
            calls = pm.describe()
            remove_dir(base)
        if problems or after:
            pytest.fail(
                "podman test left things behind:\n  "
                + "\n  ".join(problems)
                + (f"\n  and after clean-up: {after}" if after else "")
                + "\n"
                + calls
            )


# --------------------------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------------------------


class Containerd(Engine):
    """A containerd daemon of the test's own (config, socket, root, state) and `ctr` talking
    to it, in a namespace named after the test; tasks use corral through --runc-binary."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.namespace = "corral-ctrd-" + uuid.uuid4().hex[:8]
        self.root = base / "root"
        self.state = base / "state"
        self.socket = base / "containerd.sock"
        self.fifo_dir = base / "fifo"
        self.runc_root = base / "corral-state"  # containerd appends /<namespace>
        self.wrapper = write_wrapper(base / "corral", self.argv_log)
        self.config = base / "config.toml"
        disabled = [
            "io.containerd.grpc.v1.cri",  # Kubernetes' CRI: CNI, a stream server, ...
            "io.containerd.internal.v1.opt",  # would make /opt/containerd
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ]
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f"disabled_plugins = {json.dumps(disabled)}\n"
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n'
        )
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = base / "containerd.log"

    def start(self) -> None:
        with self.daemon_log.open("wb") as log:
            self.daemon = _base.spawn(
                ["containerd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        if not wait_for(lambda: self.socket.exists() or self.daemon.poll() is not None, 20):
            raise AssertionError(f"containerd did not start:\n{self.daemon_log.read_text()}")
        if self.daemon.poll() is not None:
            raise AssertionError(f"containerd exited:\n{self.daemon_log.read_text()}")

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", self.namespace, *args]

    def __call__(
        self,
        *args: str,
        input: str | bytes | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        res = run(self.ctr_argv(*args), env=self.env, input=input, timeout=timeout)
        return self.check(res) if check else res

    def tty(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        return run_pty(self.ctr_argv(*args), env=self.env, timeout=timeout)

    @property
    def run_opts(self) -> list[str]:
        return [
            "--runc-binary",
            str(self.wrapper),
            "--runc-root",
            str(self.runc_root),
            "--fifo-dir",
            str(self.fifo_dir),
        ]

    def task_status(self, cid: str) -> str | None:
        for line in self("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[-1]
        return None

    def shims(self) -> dict[int, str]:
        """The shims serving this daemon (their command line names its socket)."""
        return {
            pid: cmd
            for pid, cmd in processes_mentioning(str(self.socket)).items()
            if "containerd-shim" in cmd
        }

    # -- teardown ----------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        problems = []
        if self.daemon is not None and self.daemon.poll() is None:
            res = self("task", "ls", "-q", check=False, timeout=20)
            if tasks := res.stdout.split():
                problems.append(f"containerd tasks: {tasks}")
            res = self("container", "ls", "-q", check=False, timeout=20)
            if ctrs := res.stdout.split():
                problems.append(f"containerd containers: {ctrs}")
        if st := corral_state(self.runc_root / self.namespace):
            problems.append(f"corral state: {st}")
        if shims := self.shims():
            problems.append(f"shims: {shims}")
        if procs := cgroup_procs(self.namespace):
            problems.append(f"processes in /{self.namespace}: {procs}")
        if cg := cgroup_dirs(self.namespace):
            problems.append(f"cgroups: {[str(d) for d in cg]}")
        mounts = [m for m in mounts_under(self.dir)]
        if mounts:
            problems.append(f"mounts: {mounts}")
        return problems

    def remove_all(self) -> None:
        """Kill and delete every task and container of the namespace, through containerd."""
        if self.daemon is None or self.daemon.poll() is not None:
            return
        for cid in self("task", "ls", "-q", check=False, timeout=20).stdout.split():
            self("task", "kill", "-s", "KILL", cid, check=False, timeout=20)
            wait_for(lambda c=cid: self.task_status(c) in (None, "STOPPED"), 10, 0.1)
            self("task", "delete", cid, check=False, timeout=20)
        for cid in self("container", "ls", "-q", check=False, timeout=20).stdout.split():
            self("container", "delete", cid, check=False, timeout=20)

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and whatever of ours outlived it."""
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.terminate()
                try:
                    _base.wait_tracked(self.daemon, 10)
                except subprocess.TimeoutExpired:
                    pass
            else:
                _base.wait_tracked(self.daemon, 1)
        kill_pids(list(self.shims()))
        delete_corral_state(self.runc_root / self.namespace)
        kill_pids(list(cgroup_procs(self.namespace)))
        kill_pids(list(processes_mentioning(str(self.dir))))
        umount_under(self.dir)
        remove_cgroup_tree(self.namespace)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def containerd(busybox_oci: Path, host_paths_guard: None) -> Iterator[Containerd]:
    need_tools("containerd", "ctr", "containerd-shim-runc-v2")
    base = short_tmp_dir("corral-cd-")
    cd = Containerd(base)
    problems: list[str] = []
    try:
        cd.start()
        cd("images", "import", str(busybox_oci), timeout=60)
        yield cd
    finally:
        try:
            cd.remove_all()
            wait_for(lambda: not cd.leftovers(), 10.0, 0.1)
            problems = cd.leftovers()
        finally:
            cd.stop()
            after = [p for p in (mounts_under(base), cgroup_dirs(cd.namespace), cd.shims()) if p]
            calls = cd.describe()
            remove_dir(base)
        if problems or after:
            pytest.fail(
                "containerd test left things behind:\n  "
                + "\n  ".join(problems)
                + (f"\n  and after clean-up: {after}" if after else "")
                + "\n"
                + calls
            )
