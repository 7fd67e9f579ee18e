"""bench-control.py: corrald's control socket under load (issue 6).

    sudo .venv/bin/python bench/bench-control.py [--n 100] [--seconds 5] [--clients 1,4]
                                                 [--status 500] [--procs 50] [--json FILE]

Stdlib only; must run as root. Environment: CORRALD, CORRALCTL (default: .venv/bin/ of this
repository), CURL (default: curl on PATH).

1. N container files (``sleep 3600``, stop signal SIGKILL) are written and corrald is started
   with its control socket in a temp dir; the harness waits (through the socket) until all
   N are running.
2. List throughput: ``GET /v1/containers`` (the whole list, N entries, ~190 bytes each) in a
   closed loop for --seconds, by C client processes at once for each C in --clients, each
   client on one kept-alive connection (what a dashboard or a script with a session does),
   and once more with a new connection per request (what curl and corralctl do). Requests
   per second = all requests answered with 200 / the wall time.
3. Status latency: ``GET /v1/containers/NAME`` (inspect, which reads the cgroup's memory,
   cpu and pids files in a thread) --status times one after another on one connection;
   p50, p90, p99, max. The same for ``GET /metrics`` (every running container's cgroup),
   --status / 10 times.
4. Whole commands, as a person pays them: ``corralctl list``, ``corralctl status NAME`` and
   ``curl --unix-socket ... /v1/containers`` run --procs times each; mean and p90 wall time
   per call (process start-up included).

Everything (corrald by pid: SIGTERM then SIGKILL; the helper by pid; containers with
`delete --force`; the temp dir) is removed on exit, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV = os.path.join(REPO, ".venv", "bin")
HELPER = re.compile(r"namespace helper \(?pid (\d+)")


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("corrald", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
    return body


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def _list_loop(args: tuple[str, float, bool, float]) -> tuple[int, int]:
    """One client process: (requests answered, bytes of the last answer)."""
    sock, seconds, keep_alive, start_at = args
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.monotonic() + seconds
    n = size = 0
    conn = UnixConnection(sock)
    try:
        while time.monotonic() < end:
            if not keep_alive:
                conn.close()
                conn = UnixConnection(sock)
            size = len(get(conn, "/v1/containers"))
            n += 1
    finally:
        conn.close()
    return n, size


def list_throughput(sock: str, clients: int, seconds: float, keep_alive: bool
                    ) -> dict[str, float]:
    start_at = time.time() + 0.5
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        t0 = time.monotonic()
        results = pool.map(_list_loop, [(sock, seconds, keep_alive, start_at)] * clients)
        wall = time.monotonic() - t0 - 0.5
    total = sum(n for n, _ in results)
    return {"clients": clients, "keep_alive": keep_alive, "requests": total,
            "seconds": round(wall, 3), "rps": round(total / max(wall, seconds), 1),
            "body_bytes": results[0][1]}


def latency(sock: str, path: str, count: int) -> dict[str, float]:
    conn = UnixConnection(sock)
    times: list[float] = []
    try:
        get(conn, path)  # warm up
        for _ in range(count):
            t = time.perf_counter()
            get(conn, path)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        conn.close()
    return {"count": count, "p50_ms": round(percentile(times, 50), 3),
            "p90_ms": round(percentile(times, 90), 3),
            "p99_ms": round(percentile(times, 99), 3), "max_ms": round(max(times), 3),
            "mean_ms": round(statistics.fmean(times), 3)}


def command_time(argv: list[str], count: int) -> dict[str, float]:
    times = []
    for _ in range(count):
        t = time.perf_counter()
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=60)
        times.append((time.perf_counter() - t) * 1e3)
        if res.returncode != 0:
            raise RuntimeError(f"{argv}: exit {res.returncode}: {res.stderr.decode()[:300]}")
    return {"count": count, "mean_ms": round(statistics.fmean(times), 2),
            "p90_ms": round(percentile(times, 90), 2)}


class LoadSampler:
    """The 1-minute load average, sampled every second while the measurements run."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.samples.append(os.getloadavg()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--status", type=int, default=500)
    ap.add_argument("--procs", type=int, default=50)
    ap.add_argument("--rootfs")
    ap.add_argument("--json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("run as root")
        return 2
    corrald = os.environ.get("CORRALD", os.path.join(VENV, "corrald"))
    corralctl = os.environ.get("CORRALCTL", os.path.join(VENV, "corralctl"))
    corral = os.path.join(os.path.dirname(corrald), "corral")
    curl = os.environ.get("CURL") or shutil.which("curl")
    tmp = tempfile.mkdtemp(prefix="bench-control-")
    root = os.path.join(tmp, "state")
    sock = os.path.join(tmp, "ctl", "corrald.sock")
    proc: subprocess.Popen[bytes] | None = None
    err_path = os.path.join(tmp, "corrald.err")
    results: dict[str, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        rootfs = args.rootfs
        if rootfs is None:
            rootfs = os.path.join(tmp, "rootfs")
            subprocess.run(["/bin/sh", os.path.join(REPO, "scripts", "build-rootfs"), rootfs],
                           check=True, stdout=subprocess.DEVNULL, timeout=300)
        conf = os.path.join(tmp, "conf")
        os.makedirs(conf)
        for i in range(args.n):
            with open(os.path.join(conf, f"c{i:03d}.toml"), "w") as f:
                f.write(f'[container]\nrootfs = "{rootfs}"\ncommand = ["sleep", "3600"]\n'
                        '[stop]\nsignal = "SIGKILL"\n')
        say(f"starting corrald with {args.n} containers")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([corrald, "--config-dir", conf, "--root", root,
                                     "--log-dir", os.path.join(tmp, "logs"), "--socket", sock],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                with open(err_path) as f:
                    raise RuntimeError("corrald exited:\n" + f.read()[-2000:])
            try:
                conn = UnixConnection(sock)
                entries = json.loads(get(conn, "/v1/containers"))
                conn.close()
                if sum(e["state"] == "running" for e in entries) == args.n:
                    break
            except (OSError, RuntimeError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the containers did not all start")
            time.sleep(0.2)
        sampler = LoadSampler().__enter__()
        say("list throughput")
        lists = []
        for c in [int(x) for x in args.clients.split(",")]:
            for keep in (True, False):
                r = list_throughput(sock, c, args.seconds, keep)
                say(f"  {c} client(s), {'kept-alive' if keep else 'new connection each'}: "
                    f"{r['rps']} req/s ({r['body_bytes']} bytes each)")
                lists.append(r)
        results["list"] = lists
        say("status latency")
        results["status"] = latency(sock, f"/v1/containers/c{args.n // 2:03d}", args.status)
        say(f"  {results['status']}")
        say("metrics latency")
        results["metrics"] = latency(sock, "/metrics", max(args.status // 10, 10))
        say(f"  {results['metrics']}")
        say("whole commands")
        cmds: dict[str, object] = {
            "corralctl list": command_time([corralctl, "--socket", sock, "list"], args.procs),
            "corralctl status": command_time([corralctl, "--socket", sock, "status", "c000"],
                                             args.procs),
        }
        if curl:
            cmds["curl list"] = command_time([curl, "-sf", "--unix-socket", sock,
                                              "http://corrald/v1/containers"], args.procs)
        for k, v in cmds.items():
            say(f"  {k}: {v}")
        results["commands"] = cmds
        sampler.__exit__()
        load = sampler.samples
        results["conditions"] = {
            "containers": args.n, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_1min": {"min": min(load), "max": max(load),
                             "mean": round(statistics.fmean(load), 2)},
        }
        say(f"load average (1 min) during the run: {results['conditions']['loadavg_1min']}")
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        helper = None
        if os.path.exists(err_path):
            with open(err_path) as f:
                m = HELPER.search(f.read())
                helper = int(m.group(1)) if m else None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if helper is not None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.kill(helper, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(helper, signal.SIGKILL)
        if os.path.isdir(root) and os.path.exists(corral):
            for cid in os.listdir(root):
                if cid != "bundles":
                    subprocess.run([corral, "--root", root, "delete", "--force", cid],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=60, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
