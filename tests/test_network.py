"""corrald's bridge networks as root, on the real kernel: names over the bridge, a published
port, addresses across restarts, and nothing left behind after a stop or a ``kill -9``.

Each test uses a bridge and a /24 of its own (``crt`` + random hex, 10.213.X.0/24 with X
unused on this host), so that nothing clashes with the host or a concurrent run. Traffic
stays on this machine: container to container over the test's bridge, and the host to
127.0.0.1. Whatever happens, the fixtures remove the daemon, its helper, the containers,
the bridge, every veth and nftables table of the test, and the namespaces bound under the
test's state root; conftest's `rt` teardown then looks for leftover state, cgroups, mounts
and processes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from corral.supervisor._config import BridgeSettings, ContainerSpec, NetworkSpec
from corral.supervisor._netlink import delete_bridge, owned_links, remove_netns
from corral.supervisor._network import Network
from corral.supervisor._nft import delete_table, list_owners, table_name

pytestmark = pytest.mark.root

Runtime = Any  # conftest's Runtime (conftest cannot be imported with importlib mode)
TIMEOUT = 20.0


def _used_subnets() -> set[ipaddress.IPv4Network]:
    nets = set()
    with open("/proc/net/route") as f:
        next(f)
        for line in f:
            words = line.split()
            dest, mask = int(words[1], 16), int(words[7], 16)
            nets.add(ipaddress.IPv4Network(
                (socket.ntohl(dest), bin(mask).count("1")), strict=False))
    return nets


def fresh_settings(ipv6: bool = False) -> BridgeSettings:
    """A bridge name and a 10.213.X.0/24 that nothing on this host uses (and a ULA /64)."""
    used = _used_subnets()
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.213.{random.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            six = f"fd77:213:{secrets.token_hex(2)}::/64" if ipv6 else None
            return BridgeSettings(bridge="crt" + secrets.token_hex(4), subnet=str(net),
                                  subnet6=six)
    raise AssertionError("no free 10.213.X.0/24 on this host")


def _our_mounts(root: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(str(root) + "/"):
                out.append(point)
    return out


def network_leftovers(settings: BridgeSettings, root: Path) -> list[str]:
    """What corrald made for this bridge that is still there."""
    problems = []
    from corral.supervisor._netlink import _iproute

    with _iproute() as ipr:
        if ipr.link_lookup(ifname=settings.bridge):
            problems.append(f"bridge {settings.bridge}")
    problems += [f"veth {ifname} of {name}" for name, ifname in
                 owned_links(settings.bridge).items()]
    table = table_name(settings.bridge)
    if _table_exists(table):
        problems.append(f"nftables table ip {table}")
    problems += [f"mount {m}" for m in _our_mounts(root / "network")]
    if (root / "network").exists():
        problems.append(f"files under {root / 'network'}: "
                        f"{sorted(str(p) for p in (root / 'network').rglob('*'))}")
    return problems


def _table_exists(table: str) -> bool:
    from corral.supervisor._nft import _NFT_MSG_NEWTABLE, _msg, _transaction
    from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nftsocket import nft_table_msg

    # Creating it exclusively tells whether it exists; the probe is removed again.
    try:
        _transaction([_msg(nft_table_msg, _NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL,
                           NFTA_TABLE_NAME=table)])
    except NetlinkError:
        return True
    delete_table(table)
    return False


def remove_network(settings: BridgeSettings, root: Path) -> None:
    """Remove whatever is left of the test's network, quietly (teardown)."""
    for name in owned_links(settings.bridge):
        with contextlib.suppress(Exception):
            from corral.supervisor._netlink import detach
            detach(settings.bridge, name)
    with contextlib.suppress(Exception):
        delete_table(table_name(settings.bridge))
    with contextlib.suppress(Exception):
        delete_bridge(settings.bridge)
    for point in _our_mounts(root / "network"):
        with contextlib.suppress(Exception):
            remove_netns(point)
    subprocess.run(["rm", "-rf", str(root / "network")], check=False)


@pytest.fixture
def settings(rt: Runtime, request: pytest.FixtureRequest) -> Iterator[BridgeSettings]:
    s = fresh_settings(ipv6=bool(getattr(request, "param", False)))
    try:
        yield s
    finally:
        left = network_leftovers(s, rt.state_root)
        remove_network(s, rt.state_root)
        assert not left, f"the test left network pieces behind: {left}"


def _daemon_config(settings: BridgeSettings) -> str:
    return (f'[network]\nbridge = "{settings.bridge}"\nsubnet = "{settings.subnet}"\n'
            + (f'subnet6 = "{settings.subnet6}"\n' if settings.subnet6 else ""))


@pytest.fixture
def corrald(corrald: Any, settings: BridgeSettings) -> Iterator[Any]:
    """conftest's corrald, with this test's bridge in its corrald.toml."""
    corrald.settings = settings
    corrald.daemon_config = _daemon_config(settings)
    try:
        yield corrald
    finally:
        killed = corrald.proc is not None and corrald.proc.poll() is None
        corrald.cleanup()
        if killed:  # the test failed with corrald running: its network is the failure's
            remove_network(settings, corrald.rt.state_root)


def _add(corrald: Any, argv: list[str], network: str, *sections: str) -> str:
    """A container file running `argv` (stopped with SIGKILL) with `network` as the body of
    its [network] table; returns its name."""
    name = corrald.add("true")  # a name, cleaned up by the fixture; the file follows
    text = (f'[container]\nrootfs = "{corrald.rt.rootfs}"\ncommand = {json.dumps(argv)}\n'
            f'[stop]\nsignal = "SIGKILL"\n[network]\n{network}\n')
    text += "".join(s.strip() + "\n" for s in sections)
    (corrald.conf / f"{name}.toml").write_text(text)
    return name


def _address(corrald: Any, name: str) -> str:
    return str(corrald.wait_for(rf"{name}: network up: (\S+) on").group(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = TIMEOUT) -> str:
    """GET `url` (on loopback), retrying while the server comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/var/www"]


def test_containers_reach_each_other_by_name_and_the_host_a_published_port(corrald):
    port = _free_port()
    web = _add(corrald, HTTPD, f'mode = "bridge"\nports = ["127.0.0.1:{port}:8080/tcp"]')
    client = _add(corrald,
        ["sh", "-c", f"cat /etc/hosts; until wget -q -O - http://{web}:8080/; do sleep 0.2; "
                     "done; echo fetched; exec sleep 1000"], 'mode = "bridge"')
    corrald.start()
    web_ip, client_ip = _address(corrald, web), _address(corrald, client)
    assert web_ip != client_ip
    subnet = ipaddress.IPv4Network(corrald.settings.subnet)
    assert {ipaddress.IPv4Address(web_ip), ipaddress.IPv4Address(client_ip)} <= set(
        subnet.hosts())

    # The client found the web container by name (its /etc/hosts lists it).
    log = corrald.wait_for(r"fetched", source=lambda: corrald.log_of(client)).string
    assert "corral demo" in log
    assert re.search(rf"{re.escape(web_ip)}\t{web}\n", log)
    assert re.search(rf"{re.escape(client_ip)}\t{client}\n", log)

    # The host reaches the web container through the published port on loopback.
    assert _get(f"http://127.0.0.1:{port}/") == "corral demo\n"
    assert list_owners(table_name(corrald.settings.bridge)) == {web}
    assert set(owned_links(corrald.settings.bridge)) == {web, client}

    assert corrald.terminate() == 0
    assert network_leftovers(corrald.settings, corrald.rt.state_root) == []


def test_restarts_keep_the_address_and_fixed_addresses(corrald):
    subnet = ipaddress.IPv4Network(corrald.settings.subnet)
    fixed = str(subnet.network_address + 200)
    flaky = _add(corrald, ["sh", "-c", "ip -4 addr show eth0 | grep inet; sleep 0.3; exit 3"],
                        'mode = "bridge"', '[restart]\npolicy = "always"\n'
                        'backoff_initial = "100ms"\nstart_limit_burst = 100')
    pinned = _add(corrald, ["sleep", "1000"], f'mode = "bridge"\nip = "{fixed}"')
    corrald.start()
    assert _address(corrald, pinned) == fixed
    address = _address(corrald, flaky)
    log = corrald.wait_for(r"(?s)(inet .*){3}", source=lambda: corrald.log_of(flaky)).string
    # Every run of the restarting container had the same address.
    assert set(re.findall(r"inet (\S+)/", log)) == {address}
    assert corrald.terminate() == 0


def test_kill9_leftovers_are_cleaned_at_the_next_start(corrald):
    port = _free_port()
    web = _add(corrald, HTTPD, f'mode = "bridge"\nports = ["127.0.0.1:{port}:8080"]')
    corrald.start()
    web_ip = _address(corrald, web)
    assert _get(f"http://127.0.0.1:{port}/") == "corral demo\n"
    corrald.kill9()
    # What a crash leaves: the namespace, the veth, the rules, the lease.
    root = corrald.rt.state_root
    left = network_leftovers(corrald.settings, root)
    assert f"mount {root / 'network' / 'netns' / web}" in left
    assert web in owned_links(corrald.settings.bridge)
    assert list_owners(table_name(corrald.settings.bridge)) == {web}

    (corrald.conf / f"{web}.toml").unlink()
    other = _add(corrald, ["sleep", "1000"], 'mode = "bridge"')
    corrald.start()
    corrald.wait_for(rf"removed the networks of 1 container\(s\) left by a previous corrald: "
                     rf"{web}")
    # The dead container's address is still not handed out at once (round-robin).
    assert _address(corrald, other) != web_ip
    assert set(owned_links(corrald.settings.bridge)) == {other}
    assert list_owners(table_name(corrald.settings.bridge)) == set()
    assert not (root / "network" / "netns" / web).exists()
    assert corrald.terminate() == 0
    assert network_leftovers(corrald.settings, root) == []


@pytest.mark.root
def test_a_bridge_container_is_adopted_with_its_network(corrald):
    """kill -9 of corrald (issue 7): the container keeps serving on its published port while
    no daemon runs, and the next corrald adopts it with the same address and rules."""
    port = _free_port()
    web = _add(corrald, HTTPD, f'mode = "bridge"\nports = ["127.0.0.1:{port}:8080"]')
    corrald.start()
    web_ip = _address(corrald, web)
    assert _get(f"http://127.0.0.1:{port}/") == "corral demo\n"
    corrald.kill9()
    assert _get(f"http://127.0.0.1:{port}/") == "corral demo\n"  # nobody supervises it
    corrald.start()
    corrald.wait_for(rf"{web}: adopted \(pid \d+\)")
    assert f"{web}: network up" not in corrald.run_text  # kept, not made again
    assert _get(f"http://127.0.0.1:{port}/") == "corral demo\n"
    assert set(owned_links(corrald.settings.bridge)) == {web}
    assert list_owners(table_name(corrald.settings.bridge)) == {web}
    out = corrald.cf.run_cmd(corrald.rt.argv("exec", web, "ip", "-4", "addr", "show", "eth0"),
                             timeout=15).stdout
    assert f"inet {web_ip}/" in (out.decode() if isinstance(out, bytes) else out)
    assert corrald.terminate() == 0
    assert network_leftovers(corrald.settings, corrald.rt.state_root) == []


def _spec(name: str, rootfs: Path, **network: Any) -> ContainerSpec:
    return ContainerSpec(name, rootfs=str(rootfs), command=("true",),
                         network=NetworkSpec(mode="bridge", **network))


def test_addresses_survive_a_daemon_restart(rt, settings):
    """Two `Network`s on one root, as two daemons in a row: the second adopts the first's
    containers with their addresses and never hands out an address twice."""
    root = str(rt.state_root)

    async def main() -> None:
        first = Network(settings, root)
        a = await first.up(_spec("a", rt.rootfs))
        b = await first.up(_spec("b", rt.rootfs))
        inode = (await trio.Path(a.netns).stat()).st_ino
        hosts_inode = (await trio.Path(a.hosts).stat()).st_ino
        # The daemon is gone (no close): a new one on the same root.
        second = Network(settings, root)
        kept = await second.adopt("a")
        assert kept is not None
        assert (kept.address, kept.netns) == (a.address, a.netns)
        assert await second.adopt("nothing") is None
        c = await second.up(_spec("c", rt.rootfs))
        assert c.address not in (a.address, b.address)
        assert await second.cleanup({"a", "c"}) == ["b"]
        assert not await trio.Path(b.netns).exists()
        # A restart of the adopted container finds its namespace and address in place.
        again = await second.up(_spec("a", rt.rootfs))
        assert again.address == a.address
        assert (await trio.Path(again.netns).stat()).st_ino == inode
        hosts = await trio.Path(again.hosts).read_text()
        # Rewritten in place: a bind mount of the file keeps showing the new content.
        assert (await trio.Path(again.hosts).stat()).st_ino == hosts_inode
        assert f"{a.address}\ta\n" in hosts
        assert f"{c.address}\tc\n" in hosts
        assert "\tb\n" not in hosts
        for name in ("a", "c"):
            await second.down(name)
        await second.close()

    trio.run(main)
    assert network_leftovers(settings, rt.state_root) == []


@pytest.mark.parametrize("settings", [True], indirect=True, ids=["ipv6"])
def test_ipv6_addresses_and_names(corrald):
    web = _add(corrald, HTTPD, 'mode = "bridge"')
    client = _add(corrald,
        ["sh", "-c", f"a=$(grep -F : /etc/hosts | grep -w {web} | cut -f1); echo web6=$a; "
                     f"until wget -q -O - http://[$a]:8080/; do sleep 0.2; done; "
                     "echo fetched; exec sleep 1000"], 'mode = "bridge"')
    corrald.start()
    up = corrald.wait_for(rf"{web}: network up: (\S+), (\S+) on")
    web4, web6 = up.group(1), up.group(2)
    assert ipaddress.IPv4Address(web4) in ipaddress.IPv4Network(corrald.settings.subnet)
    assert ipaddress.IPv6Address(web6) in ipaddress.IPv6Network(corrald.settings.subnet6)
    log = corrald.wait_for(r"fetched", source=lambda: corrald.log_of(client)).string
    assert f"web6={web6}" in log
    assert "corral demo" in log
    assert corrald.terminate() == 0
    assert network_leftovers(corrald.settings, corrald.rt.state_root) == []


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def test_reload_moves_a_published_port_and_a_taken_address_is_refused(corrald):
    old_port, new_port = _free_port(), _free_port()
    subnet = ipaddress.IPv4Network(corrald.settings.subnet)
    fixed = str(subnet.network_address + 50)
    web = _add(corrald, HTTPD, f'mode = "bridge"\nip = "{fixed}"\n'
                             f'ports = ["127.0.0.1:{old_port}:8080"]')
    corrald.start()
    assert _address(corrald, web) == fixed
    assert _get(f"http://127.0.0.1:{old_port}/") == "corral demo\n"
    assert corrald.proc is not None

    # A changed port: the container restarts with its rules moved, its address kept.
    (corrald.conf / f"{web}.toml").write_text(
        (corrald.conf / f"{web}.toml").read_text().replace(str(old_port), str(new_port)))
    corrald.proc.send_signal(signal.SIGHUP)
    corrald.wait_for(rf"(?s){web}: network up: .*{web}: network up: {re.escape(fixed)} on "
                     rf"\S+, 127\.0\.0\.1:{new_port}->8080/tcp")
    assert _get(f"http://127.0.0.1:{new_port}/") == "corral demo\n"
    assert _refused(old_port)
    assert list_owners(table_name(corrald.settings.bridge)) == {web}

    # Another container asking for the same fixed address is refused, naming the owner.
    thief = _add(corrald, ["sleep", "1000"], f'mode = "bridge"\nip = "{fixed}"')
    corrald.proc.send_signal(signal.SIGHUP)
    corrald.wait_for(rf"{thief}: state \w+ -> fatal \(cannot create: network: "
                     rf"{re.escape(fixed)} is already leased to '{web}'\)")
    assert set(owned_links(corrald.settings.bridge)) == {web}
    assert _get(f"http://127.0.0.1:{new_port}/") == "corral demo\n"

    # A removed file: the container's network goes with it, the daemon keeps running.
    downs = corrald.text.count(f"{web}: network down")
    for name in (web, thief):
        (corrald.conf / f"{name}.toml").unlink()
    corrald.proc.send_signal(signal.SIGHUP)
    corrald.wait_for(rf"reload: stop {min(web, thief)}, {max(web, thief)}")
    corrald.wait_for(rf"(?s)({web}: network down.*){{{downs + 1}}}")
    assert owned_links(corrald.settings.bridge) == {}
    assert list_owners(table_name(corrald.settings.bridge)) == set()
    assert _refused(new_port)
    state = corrald.rt.state_root / "network"
    assert sorted(p.name for p in (state / "netns").iterdir()) == []
    assert sorted(p.name for p in (state / "files").iterdir()) == []
    assert json.loads((state / "ipam.json").read_text())["leases"] == {}
    assert corrald.terminate() == 0
