"""bench-network.py: time to bring a container's network up and down (issue 8), corral's
bridge mode against podman 4.3 with netavark on the same machine.

    sudo .venv/bin/python bench/bench-network.py [--runs 30] [--no-podman] [--json FILE]

Must run as root with this repository's Python (pyroute2, trio). Traffic: none beyond one
HTTP-free `true`; addresses are 10.213.250.0/24 (corral) and 10.213.251.0/24 (podman), both
on bridges the bench makes and removes.

1. corral: `Network.up` and `Network.down`, the daemon's own code path, in-process under
   trio: a new network namespace (fresh thread, no fork), a veth whose peer is created in
   it, an address from the persisted IPAM, the default route, one published port
   (127.0.0.1:P -> 80/tcp, nftables over netlink), hosts and resolv.conf. Timed: the first
   `up` (also creates the bridge and the table), then --runs pairs of up/down of a new
   container, and --runs `up` of a container whose namespace is kept (a restart).
2. podman 4.3 + netavark 1.4 (Debian's; runtime runc, own storage, run root and
   containers.conf with ``network_backend = "netavark"``): `podman run --rm IMAGE true`
   with ``--network none`` and with ``--network benchnet -p 127.0.0.1:P:80``, alternated
   --runs times; the difference of the medians is what podman's network setup and teardown
   add to a container's life. netavark calls happen inside podman's run, so this includes
   podman's own bookkeeping around them, which corral's in-process figure does not.

On this Debian, podman's default network backend is CNI; the bench sets netavark in its
own containers.conf. netavark 1.4 switches ``net.ipv4.ip_forward`` on and leaves its
iptables chains behind (iptables-nft then keeps ``ip filter``/``ip nat`` tables): the bench
puts ip_forward back, deletes the NETAVARK chains and their jumps, and drops the two tables
when they did not exist before and are empty again; likewise /run/netns (podman's, a shared
bind mount of itself) and /run/containers/networks (netavark's IPAM database) when the
bench made them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE = "localhost/corral-bench-busybox:latest"
CORRAL_SUBNET = "10.213.250.0/24"
PODMAN_SUBNET = "10.213.251.0/24"
PODMAN_OPTS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
               "--runtime", "runc"]


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3,
            "mean_ms": statistics.fmean(xs) * 1e3, "min_ms": xs[0] * 1e3,
            "p90_ms": xs[min(len(xs) - 1, int(len(xs) * 0.9))] * 1e3}


def build_rootfs(tmp: Path) -> Path:
    rootfs = tmp / "rootfs"
    subprocess.run(["/bin/sh", str(REPO / "scripts" / "build-rootfs"), str(rootfs)],
                   check=True, stdout=subprocess.DEVNULL)
    return rootfs


# --- corral -------------------------------------------------------------------------------


def bench_corral(tmp: Path, rootfs: Path, runs: int) -> dict[str, Any]:
    import trio
    from corral.supervisor._config import BridgeSettings, ContainerSpec, NetworkSpec, PortSpec
    from corral.supervisor._network import Network

    settings = BridgeSettings(bridge="crbench0", subnet=CORRAL_SUBNET)
    root = str(tmp / "corral-root")

    def spec(name: str) -> ContainerSpec:
        return ContainerSpec(name, rootfs=str(rootfs), command=("true",), network=NetworkSpec(
            mode="bridge", ports=(PortSpec("127.0.0.1", 18600, 80, "tcp"),)))

    async def main() -> dict[str, Any]:
        net = Network(settings, root)
        ups: list[float] = []
        downs: list[float] = []
        restarts: list[float] = []
        try:
            t0 = time.perf_counter()
            await net.up(spec("first"))
            first = time.perf_counter() - t0
            for i in range(runs):
                t0 = time.perf_counter()
                await net.up(spec(f"c{i}"))
                t1 = time.perf_counter()
                await net.down(f"c{i}")
                t2 = time.perf_counter()
                ups.append(t1 - t0)
                downs.append(t2 - t1)
            for _ in range(runs):
                t0 = time.perf_counter()
                await net.up(spec("first"))
                restarts.append(time.perf_counter() - t0)
        finally:
            with trio.CancelScope(shield=True):
                for name in ("first", *(f"c{i}" for i in range(runs))):
                    await net.down(name)
                await net.close()
        return {"first_up_ms": first * 1e3, "up": summary(ups), "down": summary(downs),
                "up_down": summary([a + b for a, b in zip(ups, downs, strict=True)]),
                "restart_up": summary(restarts)}

    t0 = time.perf_counter()
    import pyroute2  # noqa: F401  (its import cost, paid once by the daemon)
    imported = time.perf_counter() - t0
    result: dict[str, Any] = trio.run(main)
    result["pyroute2_import_ms"] = imported * 1e3
    return result


# --- podman + netavark --------------------------------------------------------------------


class HostState:
    """What netavark changes on the host and the bench puts back."""

    # podman 4.3 keeps network namespaces in /run/netns (made a shared bind mount of itself)
    # and netavark its IPAM database in /run/containers/networks, whatever the storage root.
    PODMAN_PATHS = ("/run/netns", "/run/containers/networks", "/run/containers")

    def __init__(self) -> None:
        self.ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        self.tables = self._tables()
        self.paths = {p for p in self.PODMAN_PATHS if os.path.lexists(p)}

    @staticmethod
    def _tables() -> set[str]:
        if shutil.which("nft") is None:
            return set()
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        return {line.strip() for line in out.stdout.splitlines() if line.strip()}

    def restore(self) -> None:
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward + "\n")
        for p in self.PODMAN_PATHS:
            if p in self.paths or not os.path.isdir(p):
                continue
            subprocess.run(["umount", p], capture_output=True)  # /run/netns: a mount
            if p.endswith("networks"):
                shutil.rmtree(p, ignore_errors=True)  # netavark's ipam.db, ours alone
            try:
                os.rmdir(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                say(f"{p} was made by podman and is not empty, left as it is: {e}")
        ipt = [["-D", "FORWARD", "-m", "comment", "--comment",
                "netavark firewall plugin rules", "-j", "NETAVARK_FORWARD"],
               ["-t", "nat", "-D", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL",
                "-j", "NETAVARK-HOSTPORT-DNAT"],
               ["-t", "nat", "-D", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL",
                "-j", "NETAVARK-HOSTPORT-DNAT"],
               ["-t", "nat", "-D", "POSTROUTING", "-j", "NETAVARK-HOSTPORT-MASQ"]]
        for chain in ("NETAVARK_FORWARD",):
            ipt += [["-F", chain], ["-X", chain]]
        for chain in ("NETAVARK-HOSTPORT-DNAT", "NETAVARK-HOSTPORT-MASQ",
                      "NETAVARK-HOSTPORT-SETMARK"):
            ipt += [["-t", "nat", "-F", chain], ["-t", "nat", "-X", chain]]
        for args in ipt:
            subprocess.run(["iptables", *args], capture_output=True)
        if shutil.which("nft") is None:
            say("nft not installed: iptables-nft's empty 'ip filter'/'ip nat' tables stay")
            return
        for table in ("table ip filter", "table ip nat"):
            if table in self.tables:
                continue
            listing = subprocess.run(["nft", "list", *table.split()], capture_output=True,
                                     text=True).stdout
            rules = [ln for ln in listing.splitlines() if ln.strip() and not any(
                ln.strip().startswith(w) for w in ("table", "chain", "type", "}"))]
            if not rules:
                subprocess.run(["nft", "delete", *table.split()], capture_output=True)
            else:
                say(f"{table} has rules now, left as it is: {rules}")


NETAVARK_PATHS = ("/usr/lib/podman/netavark", "/usr/libexec/podman/netavark")


def bench_podman(tmp: Path, rootfs: Path, runs: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="pnb", dir="/tmp"))  # podman: run root < 50 chars
    conf = base / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    f'events_logfile_path = "{base / "events.log"}"\nlock_type = "file"\n'
                    '[network]\nnetwork_backend = "netavark"\n'
                    f'network_config_dir = "{base / "networks"}"\n')
    storage = base / "storage.conf"
    storage.write_text(f'[storage]\ndriver = "overlay"\nrunroot = "{base / "runroot"}"\n'
                       f'graphroot = "{base / "storage"}"\n')
    (base / "tmp").mkdir()
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage),
           "TMPDIR": str(base / "tmp")}
    podman = ["podman", "--root", str(base / "storage"), "--runroot", str(base / "runroot"),
              "--tmpdir", str(base / "tmp"), "--cgroup-manager", "cgroupfs",
              "--events-backend", "file"]

    def pm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*podman, *args], env=env, capture_output=True, text=True,
                             timeout=120)
        if check and res.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {res.returncode}: {res.stderr}")
        return res

    host = HostState()
    try:
        tar = tmp / "busybox.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        pm("import", "-q", str(tar), IMAGE)
        backend = pm("info", "--format", "{{.Host.NetworkBackend}}").stdout.strip()
        pm("network", "create", "--disable-dns", "--subnet", PODMAN_SUBNET, "benchnet")
        none: list[float] = []
        bridged: list[float] = []
        for _ in range(2):  # warm-up
            pm("run", "--rm", *PODMAN_OPTS, "--network", "none", IMAGE, "true")
            pm("run", "--rm", *PODMAN_OPTS, "--network", "benchnet", "-p",
               "127.0.0.1:18601:80", IMAGE, "true")
        for _ in range(runs):
            for out, net in ((none, ["--network", "none"]),
                             (bridged, ["--network", "benchnet", "-p", "127.0.0.1:18601:80"])):
                t0 = time.perf_counter()
                pm("run", "--rm", *PODMAN_OPTS, *net, IMAGE, "true")
                out.append(time.perf_counter() - t0)
        version = subprocess.run(["/usr/lib/podman/netavark", "--version"],
                                 capture_output=True, text=True).stdout.strip()
        return {"backend": backend, "netavark": version, "run_none": summary(none),
                "run_bridge_port": summary(bridged),
                "network_cost_ms": (statistics.median(bridged) - statistics.median(none)) * 1e3}
    finally:
        pm("rm", "-a", "-f", check=False)
        pm("network", "rm", "-f", "benchnet", check=False)
        pm("rmi", "-a", "-f", check=False)
        pm("system", "reset", "-f", check=False)
        host.restore()
        subprocess.run(["umount", "-R", str(base / "storage" / "overlay")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-podman", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("must run as root")
        return 2
    results: dict[str, Any] = {"kernel": os.uname().release, "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="bench-network-") as d:
        tmp = Path(d)
        rootfs = build_rootfs(tmp)
        say("corral: Network.up / Network.down")
        results["corral"] = bench_corral(tmp, rootfs, args.runs)
        netavark = any(os.path.exists(p) for p in NETAVARK_PATHS)
        if args.no_podman:
            pass
        elif shutil.which("podman") and netavark:
            say("podman + netavark: podman run --rm, --network none vs bridge + port")
            results["podman"] = bench_podman(tmp, rootfs, args.runs)
        else:
            say("podman or netavark is not installed (apt-get install podman netavark "
                "nftables): the podman part is skipped")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
