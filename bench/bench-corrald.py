"""bench-corrald.py: corrald's start rate, memory per container and restart latency (issue 5).

    sudo .venv/bin/python bench/bench-corrald.py [--n 100] [--mem-ns 100,500,1000]
                                                 [--restarts 20] [--step-timeout 300]
                                                 [--policy no|always|...] [--parts ...]
                                                 [--rootfs DIR] [--json FILE]

Stdlib only; must run as root, with the Python next to $CORRALD (never a `python3` shim).
Environment: CORRALD, CORRAL (default: .venv/bin/ of this repository), RUNC, CRUN (on PATH).

1. Start rate. N container files (`sleep 3600`, memory 16M, pids 16, stop signal SIGKILL)
   are written, corrald is started (Popen) and the harness polls corrald's stderr every 5 ms
   for `NAME: state starting -> running (pid P)` lines (logged once the namespace helper
   has created *and started* the container); time from Popen until N are running / N. The
   result is checked with `corral --root R list --format json`. Compared with N sequential
   `crun run -d` (in the `unshare -m` wrapper that unmounts /sys/fs/cgroup/unified on this
   hybrid host; the wrapper alone exec'ing /bin/true is timed N times too) and
   N sequential `runc run -d`, same rootfs, same limits.
2. Memory. The same daemon then gets more files and SIGHUP (reload) up to each of --mem-ns;
   once all run and 2 s have passed, PSS (smaps_rollup) of corrald and of the namespace helper
   is read. Baseline: all files removed, SIGHUP, 0 containers (the same process, after churn)
   and a fresh corrald with an empty directory. Per container = (PSS(N) - PSS(0)) / N.
   A step that takes longer than --step-timeout is abandoned and said so.
3. Restart latency. One container `sh -c 'sleep 0.2; exit 1'`, policy on-failure, backoff
   0s, jitter 0, start limit off. The harness reads corrald's stderr through a pipe; on each
   `-> running (pid P)` line it opens a pidfd of P; exit = pidfd readable (the kernel's
   exit of the init); restart latency = next `-> running` line read - that exit. Also
   corrald's own view: `running -> backoff` line to the next `-> running` line. Run twice:
   with the default `in_place = true` (a respawn in the kept namespaces) and with
   `in_place = false` (delete + create + start each time); the helper's `respawned` and
   `created` lines are counted, so that the figure says which path it timed.

Everything (corrald by pid: SIGTERM then SIGKILL; the helper by pid; containers with
`delete --force`; cgroups named cb-<pid>-*; the temp dir) is removed on exit, failure,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV = os.path.join(REPO, ".venv", "bin")
CMD_TIMEOUT = 60
RUNNING = re.compile(r"(\S+): state \w+ -> running \(pid (\d+)\)")
HELPER = re.compile(r"namespace helper \(?pid (\d+)")


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    pass


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _quiet(argv: list[str], timeout: float = CMD_TIMEOUT) -> int:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except (OSError, subprocess.TimeoutExpired):
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Janitor:
    """Undo everything: daemons, helpers, containers (per state root), cgroups, temp dir."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.helpers: set[int] = set()
        self.roots: list[list[str]] = []  # runtime argv with --root
        self.tmp: str | None = None

    def stop_daemon(self, p: subprocess.Popen[bytes], timeout: float = 60) -> int | None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"corrald pid {p.pid} still running {timeout:g}s after SIGTERM: SIGKILL")
                p.kill()
                p.wait()
        if p in self.daemons:
            self.daemons.remove(p)
        return p.returncode

    def kill_helpers(self) -> None:
        for pid in list(self.helpers):
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:  # it exits after a shutdown
                time.sleep(0.05)
            if _alive(pid):
                say(f"namespace helper pid {pid} still running: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.helpers.discard(pid)

    def sweep(self) -> None:
        for argv in self.roots:
            try:
                out = subprocess.run([*argv, "list", "-q"], capture_output=True,
                                     timeout=CMD_TIMEOUT).stdout.decode()
            except (OSError, subprocess.TimeoutExpired):
                continue
            ids = out.split()
            if ids:
                say(f"deleting {len(ids)} container(s) left in {argv[-1]}")
            for cid in ids:
                _quiet([*argv, "delete", "--force", cid])

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for p in list(self.daemons):
            self.stop_daemon(p, 60)
        self.kill_helpers()
        self.sweep()
        cgs: set[str] = set()
        for depth in range(4):
            cgs.update(glob.glob(os.path.join("/sys/fs/cgroup", *(["*"] * (depth + 1)),
                                              f"{self.prefix}-*")))
        for d in sorted(cgs, key=lambda p: p.count("/"), reverse=True):
            if os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError as e:
                    say(f"warning: could not remove cgroup {d}: {e}")
        if self.tmp and os.path.isdir(self.tmp):
            with open("/proc/self/mountinfo") as f:
                mounted = [ln.split()[4] for ln in f if f" {self.tmp}" in ln]
            if mounted:
                say(f"warning: mounts left under {self.tmp}; not removing it: {mounted[:3]}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss for pid {pid}")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Corrald:
    """One corrald process with stderr in a file; progress read from that file."""

    def __init__(self, exe: str, tmp: str, tag: str, jan: Janitor, root: str) -> None:
        self.conf = os.path.join(tmp, f"conf-{tag}")
        self.logs = os.path.join(tmp, f"logs-{tag}")
        self.ctl = os.path.join(tmp, f"ctl-{tag}")
        self.err = os.path.join(tmp, f"corrald-{tag}.err")
        self.root = root
        self.exe, self.jan = exe, jan
        os.makedirs(self.conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self.helper: int | None = None
        self.t0 = 0.0
        self.t_first: float | None = None  # s from Popen to the first `-> starting` seen

    def argv(self) -> list[str]:
        return [self.exe, "--config-dir", self.conf, "--root", self.root, "--log-dir",
                self.logs, "--socket", os.path.join(self.ctl, "corrald.sock")]

    def start(self, stderr: int | None = None) -> None:
        with open(self.err, "wb") as err:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=err if stderr is None else stderr, cwd="/")
        self.jan.daemons.append(self.proc)

    def text(self) -> str:
        with open(self.err, errors="replace") as f:
            return f.read()

    def note_helper(self, text: str) -> None:
        m = HELPER.search(text)
        if m and self.helper is None:
            self.helper = int(m.group(1))
            self.jan.helpers.add(self.helper)

    def running(self) -> dict[str, int]:
        """Container name -> pid of its last `-> running` line, for names still running."""
        text = self.text()
        self.note_helper(text)
        state: dict[str, str] = {}
        pids: dict[str, int] = {}
        for m in re.finditer(r"(\S+): state \w+ -> (\w+)(?: \(pid (\d+)\))?", text):
            state[m.group(1)] = m.group(2)
            if m.group(3):
                pids[m.group(1)] = int(m.group(3))
        return {n: pids[n] for n, s in state.items() if s == "running" and n in pids}

    def wait_running(self, names: set[str], timeout: float) -> tuple[bool, float, int]:
        """Poll until every name runs: (all ran, seconds since Popen, how many ran)."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            run = self.running()
            if self.t_first is None and " -> starting" in self.text():
                self.t_first = now - self.t0
            n = len(names & run.keys())
            if n == len(names):
                return True, now - self.t0, n
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"corrald exited {self.proc.returncode}:\n"
                                   + self.text()[-2000:])
            if now > deadline:
                return False, now - self.t0, n
            time.sleep(0.005 if len(names) <= 200 else 0.1)

    def wait_text(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} in corrald's log")
            time.sleep(0.02)
        self.note_helper(self.text())

    def stop(self) -> int | None:
        assert self.proc is not None
        t = time.monotonic()
        rc = self.jan.stop_daemon(self.proc, 120)
        say(f"corrald stopped (exit {rc}) in {time.monotonic() - t:.1f}s")
        self.jan.kill_helpers()
        self.helper = None
        return rc


def write_container(conf: str, name: str, rootfs: str, command: list[str],
                    extra: str = "") -> None:
    text = (f'[container]\nrootfs = "{rootfs}"\ncommand = {json.dumps(command)}\n'
            '[resources]\nmemory = "16M"\npids = 16\n'
            '[stop]\nsignal = "SIGKILL"\ntimeout = "2s"\n' + extra)
    with open(os.path.join(conf, f"{name}.toml"), "w") as f:
        f.write(text)


def _policy(args: argparse.Namespace) -> str:
    """The [restart] section of the start and memory containers (--policy)."""
    return f'[restart]\npolicy = "{args.policy}"\n' if args.policy != "no" else ""


def corral_list(corral: str, root: str) -> dict[str, str]:
    out = subprocess.run([corral, "--root", root, "list", "--format", "json"],
                         capture_output=True, timeout=CMD_TIMEOUT, check=True).stdout
    return {c["id"]: c["status"] for c in json.loads(out or b"[]")}


def daemon_pss(d: Corrald) -> dict[str, int]:
    assert d.proc is not None
    assert d.helper is not None
    return {"corrald_pss": pss_kb(d.proc.pid), "helper_pss": pss_kb(d.helper),
            "corrald_rss": rss_kb(d.proc.pid), "helper_rss": rss_kb(d.helper)}


# ------------------------------------------------------------------ part 1 + 2: corrald
def bench_corrald_scale(args: argparse.Namespace, exes: dict[str, str], tmp: str,
                        rootfs: str, jan: Janitor, prefix: str) -> dict[str, object]:
    res: dict[str, object] = {}
    root = os.path.join(tmp, "state-corrald")
    jan.roots.append([exes["corral"], "--root", root])
    # Fresh baseline: an empty directory.
    d0 = Corrald(exes["corrald"], tmp, "empty", jan, root)
    d0.start()
    d0.wait_text(r"ready: ", 60)
    time.sleep(2)
    res["fresh_0"] = daemon_pss(d0)
    say(f"fresh corrald, 0 containers: {res['fresh_0']}")
    d0.stop()

    d = Corrald(exes["corrald"], tmp, "scale", jan, root)
    names = [f"{prefix}-{i:04d}" for i in range(args.n)]
    for n in names:
        write_container(d.conf, n, rootfs, ["sleep", "3600"], _policy(args))
    say(f"corrald: starting with {args.n} container files")
    d.start()
    ok, secs, got = d.wait_running(set(names), args.step_timeout)
    if not ok:
        missing = set(names) - d.running().keys()
        lines = [ln for ln in d.text().splitlines()
                 if any(m in ln for m in missing) or "ERROR" in ln or "WARNING" in ln]
        raise RuntimeError(f"only {got}/{args.n} containers running after {secs:.0f}s:\n"
                           + "\n".join(lines[-20:]))
    st = corral_list(exes["corral"], root)
    n_run = sum(1 for n in names if st.get(n) == "running")
    first = d.t_first or 0.0
    res["start"] = {"n": args.n, "total_s": secs, "per_container_ms": secs / args.n * 1e3,
                    "first_starting_s": first,
                    "after_first_starting_per_container_ms": (secs - first) / args.n * 1e3,
                    "corral_list_running": n_run}
    say(f"corrald: {args.n} running after {secs:.2f}s ({secs / args.n * 1e3:.1f} ms each); "
        f"corral list says {n_run} running")
    d.wait_text(r"ready: ", 60)

    mem: list[dict[str, object]] = []
    have = list(names)
    for target in sorted(args.mem_ns):
        if target > len(have):
            new = [f"{prefix}-{i:04d}" for i in range(len(have), target)]
            for n in new:
                write_container(d.conf, n, rootfs, ["sleep", "3600"], _policy(args))
            have += new
            t = time.monotonic()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            d.t0 = t
            ok, secs, got = d.wait_running(set(have), args.step_timeout)
            if not ok:
                say(f"STOPPED at {got}/{target}: step took more than {args.step_timeout:g}s")
                mem.append({"n": target, "reached": got, "abandoned_after_s": secs})
                break
            say(f"reload to {target}: {len(new)} started in {secs:.1f}s "
                f"({secs / len(new) * 1e3:.1f} ms each)")
        time.sleep(2)
        row: dict[str, object] = {"n": target, **daemon_pss(d),
                                  "loadavg": os.getloadavg()[0]}
        if target > args.n:
            row["reload_start_s"] = secs
        mem.append(row)
        say(f"{target} containers: {row}")
    # Baseline in the same process: all files removed, reload.
    for n in have:
        os.unlink(os.path.join(d.conf, f"{n}.toml"))
    assert d.proc is not None
    t = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + args.step_timeout
    while time.monotonic() < deadline:  # every container's last state must be `stopped`
        last = dict(re.findall(r"(\S+): state \w+ -> (\w+)", d.text()))
        left = [n for n in have if last.get(n) != "stopped"]
        if not left:
            break
        time.sleep(0.1)
    say(f"reload to 0: {time.monotonic() - t:.1f}s, {len(left)} not stopped")
    res["reload_to_0_s"] = time.monotonic() - t
    time.sleep(5)
    res["after_0"] = daemon_pss(d)
    say(f"same corrald back at 0 containers: {res['after_0']}")
    res["memory"] = mem
    d.stop()
    return res


# ------------------------------------------------------------------ part 1: crun, runc
def make_bundle(tmp: str, rootfs: str, runc: str) -> str:
    b = os.path.join(tmp, "bundle")
    os.makedirs(b)
    subprocess.run([runc, "spec", "--bundle", b], check=True, timeout=CMD_TIMEOUT)
    with open(os.path.join(b, "config.json")) as f:
        cfg = json.load(f)
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sleep", "3600"]
    cfg["root"]["path"] = rootfs
    res = cfg["linux"].setdefault("resources", {})
    res["memory"] = {"limit": 16 << 20}
    res["pids"] = {"limit": 16}
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(cfg, f)
    return b


def seq_runs(argv_of: object, n: int) -> float:
    """Seconds for n sequential commands argv_of(i), each must exit 0."""
    t = time.monotonic()
    for i in range(n):
        argv = argv_of(i)  # type: ignore[operator]
        # stderr to a file, not a pipe: a detached container's init inherits it.
        with tempfile.TemporaryFile() as err:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=err, timeout=CMD_TIMEOUT)
            if r.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{argv} failed ({r.returncode}): "
                                   f"{err.read().decode(errors='replace')[-500:]}")
    return time.monotonic() - t


def bench_oci(args: argparse.Namespace, exes: dict[str, str], tmp: str, rootfs: str,
              jan: Janitor, prefix: str) -> dict[str, object]:
    res: dict[str, object] = {}
    if not exes["runc"]:
        say("runc not found: crun/runc comparison SKIPPED")
        return res
    bundle = make_bundle(tmp, rootfs, exes["runc"])
    wrap: list[str] = []
    if os.path.ismount("/sys/fs/cgroup/unified"):
        nsrun = os.path.join(tmp, "nsrun")
        with open(nsrun, "w") as f:
            f.write('#!/bin/sh\numount /sys/fs/cgroup/unified || exit 125\nexec "$@"\n')
        os.chmod(nsrun, 0o755)
        wrap = ["unshare", "--mount", "--propagation", "private", nsrun]
    n = args.n
    if wrap:
        secs = seq_runs(lambda i: [*wrap, "true"], n)
        res["wrapper"] = {"per_call_ms": secs / n * 1e3}
        say(f"unshare wrapper alone: {secs / n * 1e3:.2f} ms per call")
    for rt in ("crun", "runc"):
        if not exes[rt]:
            say(f"{rt} not found: SKIPPED")
            continue
        state = os.path.join(tmp, f"state-{rt}")
        base = [*(wrap if rt == "crun" else []), exes[rt], "--root", state]
        jan.roots.append(base)
        secs = seq_runs(lambda i, base=base, rt=rt: [*base, "run", "-d", "--bundle", bundle,
                                                     f"{prefix}-{rt}-{i:04d}"], n)
        res[rt] = {"n": n, "total_s": secs, "per_container_ms": secs / n * 1e3,
                   "wrapped": bool(wrap and rt == "crun")}
        say(f"{rt} run -d: {n} in {secs:.2f}s ({secs / n * 1e3:.1f} ms each)")
        t = time.monotonic()
        for i in range(n):
            _quiet([*base, "delete", "--force", f"{prefix}-{rt}-{i:04d}"])
        say(f"{rt}: deleted in {time.monotonic() - t:.1f}s")
    return res


# ------------------------------------------------------------------ part 3: restarts
def bench_restart(args: argparse.Namespace, exes: dict[str, str], tmp: str, rootfs: str,
                  jan: Janitor, prefix: str, in_place: bool = True) -> dict[str, object]:
    tag = "restart" if in_place else "recreate"
    root = os.path.join(tmp, f"state-{tag}")
    jan.roots.append([exes["corral"], "--root", root])
    d = Corrald(exes["corrald"], tmp, tag, jan, root)
    name = f"{prefix}-{tag}"
    write_container(d.conf, name, rootfs, ["sh", "-c", "sleep 0.2; exit 1"],
                    '[restart]\npolicy = "on-failure"\nbackoff_initial = "0s"\n'
                    'backoff_max = "0s"\nbackoff_jitter = 0.0\nstart_limit_interval = "0s"\n'
                    f'in_place = {"true" if in_place else "false"}\n')
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        d.start(stderr=w)
    finally:
        os.close(w)
    assert d.proc is not None
    buf = b""
    text_log = open(d.err, "wb")  # noqa: SIM115 - closed in the finally below
    pfd: int | None = None
    t_exit: int | None = None
    t_backoff: int | None = None
    lat_exit: list[float] = []
    lat_backoff: list[float] = []
    missed = 0
    poller = select.poll()
    poller.register(r, select.POLLIN)
    deadline = time.monotonic() + args.step_timeout
    try:
        while len(lat_exit) < args.restarts and time.monotonic() < deadline:
            evs = poller.poll(1000)
            now = time.monotonic_ns()
            for fd, _ev in evs:
                if fd == pfd:
                    t_exit = now
                    poller.unregister(pfd)
                    os.close(pfd)
                    pfd = None
                    continue
                chunk = os.read(r, 65536)
                if not chunk:
                    raise RuntimeError("corrald closed its stderr:\n" + d.text()[-2000:])
                text_log.write(chunk)
                text_log.flush()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    m = HELPER.search(line)
                    if m:
                        d.helper = int(m.group(1))
                        jan.helpers.add(d.helper)
                    if f"{name}: state running -> backoff" in line:
                        t_backoff = now
                    m = RUNNING.search(line)
                    if m and m.group(1) == name:
                        if t_exit is not None:
                            lat_exit.append((now - t_exit) / 1e6)
                        if t_backoff is not None:
                            lat_backoff.append((now - t_backoff) / 1e6)
                        t_exit = t_backoff = None
                        try:
                            pfd = os.pidfd_open(int(m.group(2)))
                            poller.register(pfd, select.POLLIN)
                        except ProcessLookupError:
                            missed += 1
    finally:
        if pfd is not None:
            os.close(pfd)
        # Keep draining stderr while corrald stops, so it never blocks on a full pipe.
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if poller.poll(200):
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                text_log.write(chunk)
            elif d.proc.poll() is not None:
                break
        text_log.close()
        os.close(r)
        d.stop()

    def st(xs: list[float]) -> dict[str, float] | None:
        if not xs:
            return None
        return {"n": len(xs), "min": min(xs), "median": statistics.median(xs),
                "mean": statistics.fmean(xs), "max": max(xs)}
    text = d.text()
    res = {"in_place": in_place, "exit_to_running_ms": st(lat_exit),
           "backoff_line_to_running_ms": st(lat_backoff), "pidfd_missed": missed,
           "respawned": text.count(f"respawned {name}, "),
           "created": text.count(f"created {name}, "), "samples_exit": lat_exit}
    say(f"{tag}: from exit {res['exit_to_running_ms']}; from backoff line "
        f"{res['backoff_line_to_running_ms']}; pidfd missed {missed}; respawned "
        f"{res['respawned']}, created {res['created']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="containers for the start rate (100)")
    ap.add_argument("--mem-ns", default="100,500,1000",
                    help="container counts for the memory figures (100,500,1000)")
    ap.add_argument("--restarts", type=int, default=20, help="restarts to time (20)")
    ap.add_argument("--policy", default="no",
                    help="restart policy of the start and memory containers (no); with one "
                         "that restarts, the helper also keeps each one's namespaces")
    ap.add_argument("--step-timeout", type=float, default=300.0,
                    help="seconds before a step is abandoned (300)")
    ap.add_argument("--parts", default="start,oci,restart", help="start,oci,restart")
    ap.add_argument("--rootfs", help="busybox rootfs to use (default: build one)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.mem_ns = [int(x) for x in args.mem_ns.split(",") if x.strip()]
    if os.geteuid() != 0:
        print(f"{sys.argv[0]}: must run as root", file=sys.stderr)
        return 1
    exes = {"corrald": os.environ.get("CORRALD") or os.path.join(VENV, "corrald"),
            "corral": os.environ.get("CORRAL") or os.path.join(VENV, "corral"),
            "runc": shutil.which(os.environ.get("RUNC") or "runc") or "",
            "crun": shutil.which(os.environ.get("CRUN") or "crun") or ""}
    prefix = f"cb-{os.getpid()}"
    jan = Janitor(prefix)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    rc, died_of = 0, 0
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.release()} {os.cpu_count()} CPUs",
        "command": " ".join(sys.argv)}
    parts = set(args.parts.split(","))
    try:
        jan.tmp = tempfile.mkdtemp(prefix="corral-bench-corrald.")
        tmp = jan.tmp
        rootfs = args.rootfs
        if not rootfs:
            rootfs = os.path.join(tmp, "rootfs")
            subprocess.run(["sh", os.path.join(REPO, "scripts", "build-rootfs"), rootfs],
                           check=True, stdout=subprocess.DEVNULL, timeout=300)
        rootfs = os.path.abspath(rootfs)
        if "oci" in parts:
            results["oci"] = bench_oci(args, exes, tmp, rootfs, jan, prefix)
        if "start" in parts:
            results["corrald"] = bench_corrald_scale(args, exes, tmp, rootfs, jan, prefix)
        if "restart" in parts:
            time.sleep(10)  # let the teardown of the big run settle
            results["loadavg_before_restart"] = os.getloadavg()[0]
            results["restart"] = bench_restart(args, exes, tmp, rootfs, jan, prefix)
            results["restart_recreate"] = bench_restart(args, exes, tmp, rootfs, jan, prefix,
                                                        in_place=False)
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        rc, died_of = 130, signal.SIGINT
    except Interrupted as e:
        say("terminated; cleaning up")
        rc, died_of = 128 + e.args[0], e.args[0]
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        say(f"FAILED: {e}")
        print(json.dumps(results, indent=2))
        rc = 1
    finally:
        jan.run()
    if died_of:
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    return rc


if __name__ == "__main__":
    sys.exit(main())
