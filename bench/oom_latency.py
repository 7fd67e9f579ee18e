"""oom_latency.py: how soon `<runtime> events` reports an OOM kill (issue 3). Stdlib only.

    sudo .venv/bin/python bench/oom_latency.py [--runs N] [--runtimes corral,runc]
                                               [--interval 1s] [--grace S] [--rootfs DIR]
                                               [--json FILE]

Must run as root. Environment: CORRAL (default: .venv/bin/corral of this repository), RUNC
(default: runc on PATH). Run it with the Python next to $CORRAL, never a `python3` shim.

Per runtime, N iterations of:
  1. `create` a container (busybox rootfs, `runc spec`) with linux.resources.memory
     limit = swap = 32 MiB (so swap cannot absorb it) running
         sh -c 'read x < /trigger/fifo; exec tail /dev/zero'
     where /trigger is a host directory bind-mounted into the container; busybox `tail`
     buffers /dev/zero's one endless "line" without bound, so it grows until the kernel's
     OOM killer kills it (the init itself: `exec`, one process).
  2. Open the kernel-side clocks on the container: a pidfd of its init (readable when the
     killed init has exited) and, on cgroup v1, an eventfd registered on its
     memory.oom_control through cgroup.event_control (signalled when the kernel's memcg OOM
     path starts, just before it picks and kills the victim), or on v2 memory.events polled
     for POLLPRI (the kernel notifies after counting oom_kill).
  3. Start `<rt> events --interval I ID` (stdout a pipe, read line by line) and wait for its
     first stats line: by then its OOM watcher is set up.
  4. `start`, write a line to the fifo (the container's allocation begins), then one
     single-threaded poll loop timestamps (CLOCK_MONOTONIC) each wake-up of: the OOM
     notification, the pidfd, and every line from `events`.
  5. Keep reading for --grace seconds after the kill (to see duplicate reports), read the
     cgroup's oom_kill counter, `delete --force`, and read `events` for up to 1 s more to see
     reports caused by the cgroup's removal. Then the events process is stopped.

Latency = time the `{"type":"oom",...}` line was read - time of the kernel's OOM
notification ("from OOM"), and - time the init's pidfd became readable ("from exit"; can be
negative for a runtime that reports on the notification, before the victim has exited).
Per runtime: min / median / mean / max, and per iteration whether exactly one oom line came.

Everything (containers, events processes, cgroups, the temp dir) is removed on exit, also on
failure or Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
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
MIB = 1 << 20
LIMIT = 32 * MIB
CMD_TIMEOUT = 60  # seconds for any one runtime command


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, handled like Ctrl-C."""


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signum)


# ---------------------------------------------------------------------------- cleanup registry
class Janitor:
    """Everything to undo on exit: events processes, containers, cgroups, the temp dir."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.containers: list[tuple[list[str], str]] = []  # (runtime argv, id)
        self.roots: list[list[str]] = []  # runtime argv (with --root) whose `list` to sweep
        self.cgroups: set[str] = set()
        self.fds: set[int] = set()
        self.tmp: str | None = None

    def close_fd(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def stop_proc(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdout is not None:
            p.stdout.close()
        if p in self.procs:
            self.procs.remove(p)

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # nothing may cut the cleanup short
        for p in list(self.procs):
            try:
                self.stop_proc(p)
            except OSError:
                pass
        for fd in list(self.fds):
            self.close_fd(fd)
        for argv, cid in self.containers:
            _quiet([*argv, "delete", "--force", cid])
        for argv in self.roots:  # anything else in the state dirs
            try:
                out = subprocess.run([*argv, "list", "-q"], capture_output=True,
                                     timeout=CMD_TIMEOUT).stdout.decode()
            except (OSError, subprocess.TimeoutExpired):
                continue
            for cid in out.split():
                print(f"warning: deleting leftover container {cid}", file=sys.stderr)
                _quiet([*argv, "delete", "--force", cid])
        # Also cgroups of a container whose `create` was cut short before we saw its pid.
        import glob
        for depth in range(4):
            self.cgroups.update(glob.glob(os.path.join(
                "/sys/fs/cgroup", *(["*"] * (depth + 1)), f"oom-{os.getpid()}-*")))
        for d in sorted(self.cgroups, key=lambda p: p.count("/"), reverse=True):
            if os.path.isdir(d):
                print(f"warning: removing leftover cgroup {d}", file=sys.stderr)
                try:
                    os.rmdir(d)
                except OSError as e:
                    print(f"warning: could not remove {d}: {e}", file=sys.stderr)
        if self.tmp and os.path.isdir(self.tmp):
            with open("/proc/self/mountinfo") as f:
                mounted = any(f" {self.tmp}" in line for line in f)
            if mounted:
                print(f"warning: mounts left under {self.tmp}; not removing it", file=sys.stderr)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)


def _quiet(argv: list[str]) -> int:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=CMD_TIMEOUT).returncode
    except (OSError, subprocess.TimeoutExpired):
        return -1


def _check(argv: list[str], what: str) -> str:
    """Run a runtime command; its stdout. Output goes through temp files, not pipes: a
    container's init inherits `create`'s stdio and would hold a pipe open."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                           timeout=CMD_TIMEOUT)
        out.seek(0)
        err.seek(0)
        if r.returncode != 0:
            lines = err.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{what} failed (exit {r.returncode}): {' | '.join(lines[-3:])}")
        return out.read().decode()


# ---------------------------------------------------------------------------- cgroup lookup
def _cgroup_mounts() -> tuple[dict[str, str], str | None]:
    """v1 controller -> mount point, and the cgroup2 mount point (or None)."""
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _src, opts = [*post.split(), "", "", ""][:3]
            mnt = pre.split()[4]
            if fstype == "cgroup2" and v2 is None:
                v2 = mnt
            elif fstype == "cgroup":
                for o in opts.split(","):
                    v1.setdefault(o, mnt)
    return v1, v2


def cgroup_dirs(pid: int) -> tuple[list[str], str, int]:
    """All cgroup directories of `pid`, its memory cgroup directory, and its version."""
    v1, v2 = _cgroup_mounts()
    dirs: list[str] = []
    mem = None
    version = 1
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if ctrls == "" and v2:
                d = os.path.join(v2, path.lstrip("/"))
                dirs.append(d)
                if mem is None and os.path.exists(os.path.join(d, "memory.events")):
                    mem, version = d, 2
                continue
            for c in ctrls.split(","):
                base = v1.get(c) or v1.get(c.removeprefix("name="))
                if base:
                    d = os.path.join(base, path.lstrip("/"))
                    dirs.append(d)
                    if c == "memory":
                        mem, version = d, 1
    if mem is None:
        raise RuntimeError(f"no memory cgroup for pid {pid}")
    return sorted(set(dirs)), mem, version


def read_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    return out


class OomClock:
    """The kernel side, as the harness sees it: an fd to poll, stamped when it wakes.

    v1: an eventfd on memory.oom_control (cgroup.event_control). The kernel signals it when
        the memcg OOM path starts (mem_cgroup_oom), *before* the OOM killer has chosen and
        killed a victim; it stamps `t_oom`. The kill itself is placed with /dev/kmsg (Kmsg).
    v2: memory.events polled for POLLPRI: `t_oom` when its `oom` count grows, `t_kill` when
        its `oom_kill` count grows (the kernel notifies after counting each).
    """

    def __init__(self, memdir: str, version: int, jan: Janitor) -> None:
        self.version = version
        self.jan = jan
        self.notifications = 0  # v1: eventfd count; v2: growth of `oom`
        if version == 1:
            self.file = os.path.join(memdir, "memory.oom_control")
            self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            jan.fds.add(self.fd)
            ofd = os.open(self.file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(os.path.join(memdir, "cgroup.event_control"), "w") as f:
                    f.write(f"{self.fd} {ofd}")
            finally:
                os.close(ofd)
            self.events = select.POLLIN
        else:
            self.file = os.path.join(memdir, "memory.events")
            self.fd = os.open(self.file, os.O_RDONLY | os.O_CLOEXEC)
            jan.fds.add(self.fd)
            self.events = select.POLLPRI
        self.base = read_keyed(self.file)
        if version == 2:
            os.read(self.fd, 4096)  # poll reports changes after the last read

    def kills(self) -> int:
        return read_keyed(self.file).get("oom_kill", 0) - self.base.get("oom_kill", 0)

    def woke(self, t: int, res: dict[str, object]) -> None:
        """Consume a wake-up at time `t`: set res["t_oom"] / res["t_kill"] the first time."""
        if self.version == 1:
            try:
                self.notifications += os.eventfd_read(self.fd)
            except BlockingIOError:
                return
            res.setdefault("t_oom", t)
            return
        os.lseek(self.fd, 0, os.SEEK_SET)
        now = {k: int(v) for k, v in (ln.split() for ln in os.read(self.fd, 4096).decode()
                                     .splitlines())}
        self.notifications = now.get("oom", 0) - self.base.get("oom", 0)
        if self.notifications > 0:
            res.setdefault("t_oom", t)
        if now.get("oom_kill", 0) > self.base.get("oom_kill", 0):
            res.setdefault("t_kill", t)

    def close(self) -> None:
        self.jan.close_fd(self.fd)


class Kmsg:
    """/dev/kmsg from now on: the kernel's own timestamps of the OOM report.

    The OOM killer logs "<comm> invoked oom-killer" when it starts (right after the v1
    notification) and "Killed process <pid>" right after sending SIGKILL; the difference of
    the two kernel timestamps (same clock, µs) is how long after the notification the kill
    happened. None when /dev/kmsg cannot be read.
    """

    def __init__(self, jan: Janitor) -> None:
        self.jan = jan
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.fd = -1
            return
        jan.fds.add(self.fd)
        os.lseek(self.fd, 0, os.SEEK_END)

    def kill_delay_ns(self, pid: int) -> int | None:
        """ns from the last "invoked oom-killer" before the kill of `pid` to that kill."""
        if self.fd < 0:
            return None
        invoked = None
        found = None
        while True:
            try:
                rec = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten before we read them: go on
                continue
            head, _, msg = rec.partition(";")
            fields = head.split(",")
            if len(fields) < 3 or not fields[2].isdigit():
                continue
            us = int(fields[2])
            msg = msg.split("\n", 1)[0]
            if " invoked oom-killer:" in msg:
                invoked = us
            elif f"Killed process {pid} " in msg and invoked is not None and found is None:
                found = (us - invoked) * 1000
        self.jan.close_fd(self.fd)
        self.fd = -1
        return found


# ---------------------------------------------------------------------------- events reader
class Lines:
    """Non-blocking line reader on a pipe, each line stamped with the time it was read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = b""
        self.eof = False
        self.t_eof = 0
        self.lines: list[tuple[int, str]] = []

    def read(self, t: int) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                self.t_eof = t
                return
            self.buf += data
            *done, self.buf = self.buf.split(b"\n")
            self.lines += [(t, ln.decode(errors="replace")) for ln in done if ln.strip()]


def _type(line: str) -> str:
    try:
        return str(json.loads(line).get("type"))
    except (ValueError, AttributeError):
        return "?"


# ---------------------------------------------------------------------------- one iteration
def iteration(rt: str, argv: list[str], bundle: str, fifo: str, cid: str, args: argparse.Namespace,
              jan: Janitor, logdir: str) -> dict[str, object]:
    res: dict[str, object] = {"runtime": rt, "id": cid}
    jan.containers.append((argv, cid))
    _check([*argv, "create", "--bundle", bundle, cid], f"{rt} create")
    st = json.loads(_check([*argv, "state", cid], f"{rt} state"))
    pid = int(st["pid"])
    dirs, memdir, version = cgroup_dirs(pid)
    jan.cgroups.update(dirs)
    res["cgroup"] = memdir
    res["cgroup_version"] = version
    for f, want in (("memory.limit_in_bytes", LIMIT), ("memory.memsw.limit_in_bytes", LIMIT),
                    ("memory.max", LIMIT), ("memory.swap.max", 0)):
        p = os.path.join(memdir, f)
        if os.path.exists(p):
            with open(p) as fh:
                got = fh.read().strip()
            if got != str(want):
                raise RuntimeError(f"{rt}: {f} is {got}, expected {want}")
    pidfd = os.pidfd_open(pid)
    jan.fds.add(pidfd)
    clock = OomClock(memdir, version, jan)

    errpath = os.path.join(logdir, f"{cid}.events.err")
    errlog = open(errpath, "wb")  # noqa: SIM115 (closed once Popen holds it)
    proc = subprocess.Popen([*argv, "events", "--interval", args.interval, cid],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog)
    errlog.close()
    jan.procs.append(proc)
    assert proc.stdout is not None
    out = Lines(proc.stdout.fileno())
    poller = select.poll()
    poller.register(out.fd, select.POLLIN)

    def pump(until_ns: int, stop: object) -> None:
        while time.monotonic_ns() < until_ns and not stop():  # type: ignore[operator]
            left = (until_ns - time.monotonic_ns()) / 1e6
            ready = poller.poll(max(0, int(left) + 1))
            t = time.monotonic_ns()  # one time per wake-up: fds ready together tie
            for fd, _mask in ready:
                if fd == out.fd:
                    out.read(t)
                    if out.eof:
                        poller.unregister(out.fd)
                elif fd == pidfd:
                    res.setdefault("t_exit", t)
                    poller.unregister(pidfd)
                elif fd == clock.fd:
                    clock.woke(t, res)

    # 3. wait for the first stats line: the watcher is set up by then
    pump(time.monotonic_ns() + int(args.timeout * 1e9), lambda: out.lines or out.eof)
    if not out.lines:
        with open(errpath, errors="replace") as fh:
            err = " | ".join(fh.read().strip().splitlines()[-3:])
        raise RuntimeError(f"{rt} events printed nothing within {args.timeout} s"
                           f"{': ' + err if err else ''}")
    n_ready = len(out.lines)

    # 4. start, trigger, measure
    kmsg = Kmsg(jan)
    _check([*argv, "start", cid], f"{rt} start")
    poller.register(pidfd, select.POLLIN)
    poller.register(clock.fd, clock.events)
    deadline = time.monotonic() + args.timeout
    while True:  # the container's shell opens the fifo for reading: then we can write
        try:
            wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as e:
            if e.errno != 6 or time.monotonic() > deadline:  # ENXIO: no reader yet
                raise RuntimeError(f"{rt}: container never opened the trigger fifo: {e}") from e
            time.sleep(0.001)
    try:
        os.write(wfd, b"go\n")
    finally:
        os.close(wfd)
    res["t_trigger"] = time.monotonic_ns()

    def oom_lines() -> list[int]:
        return [t for t, ln in out.lines[n_ready:] if _type(ln) == "oom"]

    end = time.monotonic_ns() + int(args.timeout * 1e9)
    pump(end, lambda: "t_exit" in res)
    if "t_exit" not in res:
        raise RuntimeError(f"{rt}: no OOM kill within {args.timeout} s of the trigger")
    # grace: duplicates, or a report still on its way
    t_exit = int(res["t_exit"])  # type: ignore[call-overload]
    pump(t_exit + int(args.grace * 1e9), lambda: out.eof)
    res["oom_kill"] = clock.kills()
    res["kernel_notifications"] = clock.notifications
    ooms = oom_lines()
    res["oom_lines"] = len(ooms)
    res["oom_line_data"] = [json.loads(ln).get("data") for _, ln in out.lines[n_ready:]
                            if _type(ln) == "oom"]
    if ooms:
        res["t_line"] = ooms[0]
    for fd in (clock.fd, pidfd):
        try:
            poller.unregister(fd)
        except KeyError:
            pass
    clock.close()
    jan.close_fd(pidfd)
    delay = kmsg.kill_delay_ns(pid)
    if delay is not None:
        res["kmsg_kill_delay_ns"] = delay
        if "t_kill" not in res and "t_oom" in res:
            res["t_kill"] = int(res["t_oom"]) + delay  # type: ignore[call-overload]

    if out.eof:  # `events` ended by itself once the container stopped (within the grace)
        res["t_eof"] = out.t_eof
    # 5. delete, and see whether the removal makes `events` report anything
    n_before = len(out.lines)
    _check([*argv, "delete", "--force", cid], f"{rt} delete --force")
    jan.containers.remove((argv, cid))
    pump(time.monotonic_ns() + int(1e9), lambda: out.eof)
    res["oom_lines_after_delete"] = sum(1 for _, ln in out.lines[n_before:] if _type(ln) == "oom")
    res["events_ended_by_delete"] = out.eof and "t_eof" not in res
    jan.stop_proc(proc)
    res["events_rc"] = proc.returncode
    left = [d for d in dirs if os.path.isdir(d)]
    if left:
        res["leftover_cgroups"] = left
    return res


# ---------------------------------------------------------------------------- setup and report
def make_bundle(tmp: str, rootfs: str, spec_argv: list[str]) -> tuple[str, str]:
    bundle = os.path.join(tmp, "bundle")
    trig = os.path.join(tmp, "trigger")
    os.makedirs(bundle)
    os.makedirs(trig)
    fifo = os.path.join(trig, "fifo")
    os.mkfifo(fifo, 0o600)
    subprocess.run([*spec_argv, "spec"], cwd=bundle, check=True, timeout=CMD_TIMEOUT)
    cfg_path = os.path.join(bundle, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/sh", "-c", "read x < /trigger/fifo; exec tail /dev/zero"]
    cfg["root"]["path"] = rootfs
    cfg["mounts"].append({"destination": "/trigger", "type": "bind", "source": trig,
                          "options": ["rbind", "rw"]})
    cfg["linux"].setdefault("resources", {})["memory"] = {"limit": LIMIT, "swap": LIMIT}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return bundle, fifo


def summarize(rt: str, rows: list[dict[str, object]], runs: int) -> dict[str, object]:
    ok = [r for r in rows if "error" not in r]

    def ms(a: str, b: str) -> list[float]:
        return [(int(r[a]) - int(r[b])) / 1e6 for r in ok  # type: ignore[call-overload]
                if a in r and b in r]

    def stat(xs: list[float]) -> dict[str, float] | None:
        if not xs:
            return None
        return {"n": len(xs), "min": min(xs), "median": statistics.median(xs),
                "mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "max": max(xs)}

    def total(k: str) -> int:
        return sum(int(r[k]) for r in ok)  # type: ignore[call-overload]

    return {
        "runtime": rt, "iterations": runs, "failed": len(rows) - len(ok),
        "exactly_one": sum(1 for r in ok if r["oom_lines"] == 1),
        "missing": sum(1 for r in ok if r["oom_lines"] == 0),
        "extra": sum(max(0, int(r["oom_lines"]) - 1) for r in ok),  # type: ignore[call-overload]
        "after_delete": total("oom_lines_after_delete"),
        "kills": total("oom_kill"), "notifications": total("kernel_notifications"),
        "events_ended_at_stop": sum(1 for r in ok if "t_eof" in r),
        "from_oom": stat(ms("t_line", "t_oom")),
        "from_kill": stat(ms("t_line", "t_kill")),
        "from_exit": stat(ms("t_line", "t_exit")),
        "trigger_to_oom": stat(ms("t_oom", "t_trigger")),
        "oom_to_kill": stat(ms("t_kill", "t_oom")),
        "kill_to_exit": stat(ms("t_exit", "t_kill")),
        "exit_to_eof": stat(ms("t_eof", "t_exit")),
    }


def report(sums: list[dict[str, object]], args: argparse.Namespace) -> str:
    def f(st: object, k: str) -> str:
        return "-" if not st else f"{st[k]:.2f}"  # type: ignore[index]

    def row(name: str, st: object) -> str:
        if not st:
            return f"| {name} | 0 | - | - | - | - |"
        ms = f"{st['mean']:.2f} ± {st['stdev']:.2f}"  # type: ignore[index]
        return (f"| {name} | {st['n']} | {f(st, 'min')} | {f(st, 'median')} | {ms} | "  # type: ignore[index]
                f"{f(st, 'max')} |")

    head = ["| Runtime | n | Min | Median | Mean ± σ | Max |",  # noqa: RUF001
            "|:---|---:|---:|---:|---:|---:|"]
    out = [f"OOM report latency of `<rt> events --interval {args.interval}` "
           f"({args.runs} iterations per runtime, grace {args.grace} s)", ""]
    for key, title in (
            ("from_kill", "oom line read - OOM kill (SIGKILL sent) [ms]"),
            ("from_oom", "oom line read - kernel OOM notification [ms]"),
            ("from_exit", "oom line read - container init exited (pidfd readable) [ms]")):
        out += [f"### {title}", "", *head]
        out += [row(str(s["runtime"]), s[key]) for s in sums]
        out.append("")
    out += ["### oom lines per iteration", "",
            "| Runtime | iterations | failed | exactly one | missing | extra | after delete "
            "| kernel oom_kill | kernel OOM notifications | events ended by itself |",
            "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sums:
        out.append(f"| {s['runtime']} | {s['iterations']} | {s['failed']} | {s['exactly_one']} | "
                   f"{s['missing']} | {s['extra']} | {s['after_delete']} | {s['kills']} | "
                   f"{s['notifications']} | {s['events_ended_at_stop']} |")
    out += ["", "### kernel side and the events process [ms, median (max)]", "",
            "| Runtime | trigger → notification | notification → kill | kill → exit "
            "| exit → events ended |", "|:---|---:|---:|---:|---:|"]

    def mm(st: object) -> str:
        return "-" if not st else f"{f(st, 'median')} ({f(st, 'max')})"
    for s in sums:
        out.append(f"| {s['runtime']} | {mm(s['trigger_to_oom'])} | {mm(s['oom_to_kill'])} | "
                   f"{mm(s['kill_to_exit'])} | {mm(s['exit_to_eof'])} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="iterations per runtime (10)")
    ap.add_argument("--runtimes", default="corral,runc", help="comma-separated (corral,runc)")
    ap.add_argument("--interval", default="1s", help="events --interval (1s)")
    ap.add_argument("--grace", type=float, default=1.0,
                    help="seconds to keep reading after the kill, for duplicates (1.0)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-step timeout, s (10)")
    ap.add_argument("--rootfs", help="busybox rootfs to use (default: build one)")
    ap.add_argument("--json", help="also write every iteration and the summary here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print(f"{sys.argv[0]}: must run as root", file=sys.stderr)
        return 1

    exes = {"corral": os.environ.get("CORRAL") or os.path.join(REPO, ".venv", "bin", "corral"),
            "runc": shutil.which(os.environ.get("RUNC") or "runc") or ""}
    jan = Janitor()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    rc = 0
    died_of = 0
    try:
        jan.tmp = tempfile.mkdtemp(prefix="corral-oom.")
        tmp = jan.tmp
        rootfs = args.rootfs
        if not rootfs:
            rootfs = os.path.join(tmp, "rootfs")
            subprocess.run(["sh", os.path.join(REPO, "scripts", "build-rootfs"), rootfs],
                           check=True, stdout=subprocess.DEVNULL, timeout=300)
        rootfs = os.path.abspath(rootfs)
        spec_argv = [exes["runc"]] if exes["runc"] else [exes["corral"]]
        bundle, fifo = make_bundle(tmp, rootfs, spec_argv)
        logdir = os.path.join(tmp, "logs")
        os.makedirs(logdir)
        all_rows: list[dict[str, object]] = []
        sums = []
        for rt in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
            exe = exes.get(rt)
            if not exe or not os.access(exe, os.X_OK):
                say(f"{rt} SKIPPED: not found (set {rt.upper()}=)")
                continue
            state = os.path.join(tmp, "state", rt)
            os.makedirs(state)
            argv = [exe, "--root", state]
            jan.roots.append(argv)
            rows = []
            say(f"{rt}: {args.runs} OOM kills")
            for i in range(args.runs):
                cid = f"oom-{os.getpid()}-{rt}-{i}"
                try:
                    row = iteration(rt, argv, bundle, fifo, cid, args, jan, logdir)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    row = {"runtime": rt, "id": cid, "error": str(e)}
                    say(f"{rt} #{i}: FAILED: {e}")
                    if os.environ.get("OOM_LATENCY_DEBUG"):
                        import traceback
                        traceback.print_exc()
                    for p in list(jan.procs):
                        jan.stop_proc(p)
                    for fd in list(jan.fds):
                        jan.close_fd(fd)
                    for a, c in list(jan.containers):
                        _quiet([*a, "delete", "--force", c])
                        jan.containers.remove((a, c))
                    if i == 0:  # first try fails: the runtime cannot do this at all
                        rows.append(row)
                        say(f"{rt} SKIPPED after its first iteration failed")
                        break
                else:
                    def d(a: str, b: str, r: dict[str, object] = row) -> str:
                        if a not in r or b not in r:
                            return "  -  "
                        return f"{(int(r[a]) - int(r[b])) / 1e6:7.2f}"  # type: ignore[call-overload]
                    say(f"{rt} #{i}: oom lines {row['oom_lines']}"
                        f" (+{row['oom_lines_after_delete']} after delete),"
                        f" kills {row['oom_kill']}, notifications {row['kernel_notifications']};"
                        f" line - kill {d('t_line', 't_kill')} ms,"
                        f" line - notification {d('t_line', 't_oom')} ms,"
                        f" line - exit {d('t_line', 't_exit')} ms")
                rows.append(row)
            all_rows += rows
            sums.append(summarize(rt, rows, len(rows)))
        if not sums:
            say("no runtime to measure")
            return 1
        print(report(sums, args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"summary": sums, "iterations": all_rows}, f, indent=2)
        if any(s["failed"] for s in sums):
            rc = 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        rc, died_of = 130, signal.SIGINT
    except Interrupted as e:
        print("terminated; cleaning up", file=sys.stderr)
        rc, died_of = 128 + e.args[0], e.args[0]
    finally:
        jan.run()
    if died_of:
        # Die of the signal, as a shell expects of a program it ran (so the calling script
        # stops too, instead of taking the signal as handled).
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    return rc


if __name__ == "__main__":
    sys.exit(main())
