"""corrald's container networks: the bridge, each container's namespace, address, names and
published ports, and the cleanup of all of it.

One `Network` per daemon. For a container in ``bridge`` mode, `Network.up` builds the whole
network *before* the container exists, in a network namespace bound at
``<root>/network/netns/<name>``:

1. the bridge (``BridgeSettings.bridge``, the subnet's first address) and corrald's nftables
   table, once;
2. an address from `Ipam`, persisted before it is used;
3. the namespace (`_netlink.create_netns`: a fresh thread, no fork), ``lo`` up;
4. a veth pair whose container end is created inside it as ``eth0``, with the address and a
   default route via the bridge;
5. the DNAT rules of its published ports (`_nft`);
6. ``hosts`` and ``resolv.conf`` under ``<root>/network/files/<name>/``.

The container then *joins* that namespace by path (`oci_changes`: ``{"type": "network",
"path": ...}`` and two read-only bind mounts over /etc/hosts and /etc/resolv.conf), so
nothing is left to do once it runs, and the namespace helper needs no network code.

The namespace and the address outlive restarts of the container (same address, cheaper
restart: `up` only checks that the veth is still there); `down` removes everything once
the container is stopped for good or removed. `cleanup(keep)` at start-up removes every
namespace, veth, rule, lease and file that corrald owns for a container not in `keep`
(after a crash or a ``kill -9``), and `adopt(name)` keeps a running container's network
for the daemon that takes it over. `close` at exit removes the bridge and the table when
no container is left on them.

Names: every bridge container's /etc/hosts lists every other one on the bridge by its
container name, and itself by hostname and name. The files are bind-mounted, so they are
rewritten in place (truncate and write), never replaced by a rename, which would leave the
container reading the old inode.

The blocking work runs in trio worker threads, serialised by one lock: network changes
are short, and the lock keeps the leases, the hosts files and the rules consistent.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._ipam import AddressError, Ipam

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import BridgeSettings, ContainerSpec

__all__ = ["Attachment", "Network", "NetworkError", "oci_changes"]

log = logging.getLogger("corrald")

HOSTS_HEADER = ("127.0.0.1\tlocalhost\n"
                "::1\tlocalhost ip6-localhost ip6-loopback\n")
_HOST_NAME_MAX = 64


class NetworkError(Exception):
    """A container's network could not be set up; the message says what failed."""


@attrs.frozen
class Attachment:
    """What a bridge container's OCI config needs: its namespace and its two files."""

    name: str
    address: str
    netns: str
    hosts: str
    resolv_conf: str
    address6: str | None = None


def oci_changes(cfg: dict[str, Any], att: Attachment) -> dict[str, Any]:
    """Make `cfg` (an OCI config, changed in place and returned) join `att`'s namespace and
    bind-mount its hosts and resolv.conf read-only."""
    lx = cfg.setdefault("linux", {})
    nss = [ns for ns in lx.get("namespaces", []) if ns.get("type") != "network"]
    nss.append({"type": "network", "path": att.netns})
    lx["namespaces"] = nss
    mounts = cfg.setdefault("mounts", [])
    for dest, src in (("/etc/hosts", att.hosts), ("/etc/resolv.conf", att.resolv_conf)):
        mounts.append({"destination": dest, "type": "bind", "source": src,
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    return cfg


def _resolv_conf() -> bytes:
    """The host's resolv.conf without loopback name servers (unreachable from a container,
    as Docker also drops them)."""
    try:
        with open("/etc/resolv.conf", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    keep = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and (
                words[1].startswith("127.") or words[1] == "::1"):
            continue
        keep.append(line)
    return ("\n".join(keep) + "\n").encode() if keep else b""


def _rewrite(path: str, data: bytes) -> None:
    """Write `path` in place (same inode): it may be bind-mounted into a container."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class Network:
    """The networks of one daemon (its bridge, under its state root).

    Args:
        settings: the bridge name and subnet.
        root: corrald's runtime root; everything lives under ``root/network``.
        limiter: the daemon's thread limiter.
    """

    settings: BridgeSettings
    root: str
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(8))
    _lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _ipam: Ipam | None = attrs.field(init=False, default=None)
    _ipam6: Ipam | None = attrs.field(init=False, default=None)
    _hostnames: dict[str, str] = attrs.field(init=False, factory=dict)
    _ports: dict[str, tuple[Any, ...]] = attrs.field(init=False, factory=dict)
    _bridge_ready: bool = attrs.field(init=False, default=False)

    @property
    def directory(self) -> str:
        return os.path.join(self.root, "network")

    @property
    def table(self) -> str:
        from ._nft import table_name

        return table_name(self.settings.bridge)

    def netns_path(self, name: str) -> str:
        return os.path.join(self.directory, "netns", name)

    def files_dir(self, name: str) -> str:
        return os.path.join(self.directory, "files", name)

    def _attachment(self, name: str, address: str) -> Attachment:
        d = self.files_dir(name)
        six = self._leases6()
        return Attachment(name, address, self.netns_path(name), os.path.join(d, "hosts"),
                          os.path.join(d, "resolv.conf"),
                          six.get(name) if six is not None else None)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _leases(self) -> Ipam:
        """The IPv4 leases (read from their file on the first call: call it in a thread)."""
        if self._ipam is None:
            self._ipam = Ipam(os.path.join(self.directory, "ipam.json"),
                              self.settings.subnet)
            self._leases6()
        return self._ipam

    def _leases6(self) -> Ipam | None:
        """The IPv6 leases, or None without ``subnet6``."""
        if self._ipam6 is None and self.settings.subnet6 is not None:
            self._ipam6 = Ipam(os.path.join(self.directory, "ipam6.json"),
                               self.settings.subnet6)
        return self._ipam6

    async def _ipam_call(self, fn: Callable[[Ipam], Any]) -> Any:
        return await self._run(lambda: fn(self._leases()))

    # --- up and down ----------------------------------------------------------------------

    async def up(self, spec: ContainerSpec) -> Attachment:
        """Set up (or find still set up) the network of bridge container `spec`.

        Raises:
            NetworkError: the address, the namespace, the veth or the rules failed; what
                was made for this call is removed again.
        """
        async with self._lock:
            try:
                await self._run(self._leases)  # the first call reads the file: off the loop
                return await self._up(spec)
            except (OSError, AddressError) as e:
                raise NetworkError(f"network: {e}") from e
            except Exception as e:
                from pyroute2.netlink.exceptions import NetlinkError  # loaded by now

                if not isinstance(e, NetlinkError):
                    raise
                raise NetworkError(f"network: netlink: {e}") from e

    async def _up(self, spec: ContainerSpec) -> Attachment:
        from . import _netlink, _nft

        name, s = spec.name, self.settings
        ipam, six = self._leases(), self._leases6()
        ports = spec.network.ports
        try:
            if not self._bridge_ready:
                await self._run(_netlink.ensure_bridge, s.bridge, ipam.gateway,
                                ipam.prefixlen, six.gateway if six else None,
                                six.prefixlen if six else 64)
                await self._run(_nft.ensure_table, self.table, s.bridge)
                self._bridge_ready = True
            self._hostnames[name] = (spec.hostname or name)[:_HOST_NAME_MAX]
            old = ipam.get(name)
            if old is not None and spec.network.ip not in (None, old):
                await self._teardown(name)  # a new fixed address: start afresh
                self._hostnames[name] = (spec.hostname or name)[:_HOST_NAME_MAX]
                old = None
            address = await self._ipam_call(lambda i: i.allocate(name, spec.network.ip))
            if six is not None:
                await self._run(six.allocate, name)
            att = self._attachment(name, address)
            links = await self._run(_netlink.owned_links, s.bridge)
            there = await self._run(os.path.exists, att.netns)
            if old is None or name not in links or not there:
                await self._run(self._fresh_netns, att)
            if self._ports.get(name) != (address, ports):
                await self._run(_nft.remove_ports, self.table, [name])
                await self._run(_nft.add_ports, self.table, name, address, ports)
                self._ports[name] = (address, ports)
            await self._run(self._write_files, att)
        except BaseException:
            self._bridge_ready = False  # check the bridge and table again next time
            with trio.CancelScope(shield=True):
                await self._teardown(name)
            raise
        log.info("%s: network up: %s on %s%s", name,
                 address + (f", {att.address6}" if att.address6 else ""), s.bridge,
                 "".join(f", {p.host_ip or '*'}:{p.host_port}->{p.container_port}/"
                         f"{p.protocol}" for p in ports))
        return att

    def _fresh_netns(self, att: Attachment) -> None:
        """(blocking) A new namespace at att.netns with eth0 on the bridge."""
        from . import _netlink

        ipam, six = self._leases(), self._leases6()
        _netlink.detach(self.settings.bridge, att.name)
        _netlink.remove_netns(att.netns)
        _netlink.create_netns(att.netns)
        _netlink.attach(att.netns, self.settings.bridge, att.name, att.address,
                        ipam.prefixlen, ipam.gateway, att.address6,
                        six.prefixlen if six else 64, six.gateway if six else None)

    def _write_files(self, att: Attachment) -> None:
        """(blocking) The container's resolv.conf, and every bridge container's hosts."""
        os.makedirs(self.files_dir(att.name), mode=0o755, exist_ok=True)
        _rewrite(att.resolv_conf, _resolv_conf())
        self._write_all_hosts()

    def _write_all_hosts(self) -> None:
        leases = dict(self._leases().leases)
        six = self._leases6()
        leases6 = dict(six.leases) if six is not None else {}
        for name in leases:
            d = self.files_dir(name)
            if not os.path.isdir(d):
                continue
            lines = [HOSTS_HEADER]
            own = self._hostnames.get(name, name)
            names = own + (f" {name}" if own != name else "")
            for book in (leases, leases6):
                if name in book:
                    lines.append(f"{book[name]}\t{names}\n")
            for other in sorted(leases):
                for book in (leases, leases6):
                    if other != name and other in book:
                        lines.append(f"{book[other]}\t{other}\n")
            _rewrite(os.path.join(d, "hosts"), "".join(lines).encode())

    async def down(self, name: str) -> None:
        """Remove container `name`'s network: rules, veth, namespace, files and lease.

        Safe to call for a container that has none. Errors are logged, not raised: a stop
        must go on, and the next start-up cleanup retries.
        """
        async with self._lock:
            await self._run(self._leases)
            await self._teardown(name)

    async def _teardown(self, name: str) -> None:
        from . import _netlink, _nft

        had = name in self._hostnames or self._leases().get(name) is not None
        steps: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("rules", _nft.remove_ports, (self.table, [name])),
            ("veth", _netlink.detach, (self.settings.bridge, name)),
            ("namespace", _netlink.remove_netns, (self.netns_path(name),)),
            ("files", shutil.rmtree, (self.files_dir(name), True)),
        ]
        for what, fn, args in steps:
            try:
                await self._run(fn, *args)
            except Exception as e:
                log.warning("%s: network cleanup: %s: %s", name, what, e)
        self._ports.pop(name, None)
        self._hostnames.pop(name, None)
        try:
            await self._ipam_call(lambda i: i.release(name))
            six = self._leases6()
            if six is not None:
                await self._run(six.release, name)
            await self._run(self._write_all_hosts)
        except OSError as e:
            log.warning("%s: network cleanup: lease: %s", name, e)
        if had:
            log.info("%s: network down", name)

    # --- daemon start and exit ------------------------------------------------------------

    async def adopt(self, name: str, hostname: str | None = None) -> Attachment | None:
        """Keep the network of a running container that this daemon takes over.

        Returns its attachment (same address, same namespace), or None when it has no
        bridge network (no lease or no namespace).
        """
        async with self._lock:
            address = (await self._run(self._leases)).get(name)
            if address is None or not await self._run(os.path.exists, self.netns_path(name)):
                return None
            self._hostnames[name] = (hostname or name)[:_HOST_NAME_MAX]
            return self._attachment(name, address)

    async def cleanup(self, keep: set[str]) -> list[str]:
        """Remove everything corrald owns on this bridge for containers not in `keep`:
        namespaces, veths, rules, files and leases (after a crash or a restart).

        Returns the names cleaned, sorted.
        """
        from . import _netlink, _nft

        async with self._lock:
            if not await self._run(os.path.isdir, self.directory):
                # Nothing was ever set up under this root (the directory comes first): no
                # netlink, and no pyroute2 import, for a daemon without bridge containers.
                return []
            await self._run(self._leases)
            names: set[str] = set()
            netns_dir = os.path.join(self.directory, "netns")
            files_dir = os.path.join(self.directory, "files")
            for d in (netns_dir, files_dir):
                try:
                    names.update(await self._run(os.listdir, d))
                except FileNotFoundError:
                    pass
            names.update(self._leases().leases)
            six = self._leases6()
            names.update(six.leases if six is not None else ())
            try:
                names.update(await self._run(_netlink.owned_links, self.settings.bridge))
                names.update(await self._run(_nft.list_owners, self.table))
            except Exception as e:
                log.warning("network cleanup: listing links and rules: %s", e)
            gone = sorted(names - keep)
            for name in gone:
                await self._teardown(name)
            if gone:
                log.warning("removed the networks of %d container(s) left by a previous "
                            "corrald: %s", len(gone), ", ".join(gone))
            return gone

    def _remove_directory(self) -> None:
        """(blocking) ``ROOT/network`` once nothing is left in it but empty lease files."""
        for sub in ("netns", "files"):
            try:
                os.rmdir(os.path.join(self.directory, sub))
            except OSError:
                pass
        for f in ("ipam.json", "ipam6.json"):
            try:
                os.unlink(os.path.join(self.directory, f))
            except OSError:
                pass
        try:
            os.rmdir(self.directory)
        except OSError:
            pass

    async def close(self) -> None:
        """At exit: remove the bridge and the table when no container is left on them."""
        from . import _netlink, _nft

        async with self._lock:
            if not self._bridge_ready and not await self._run(os.path.isdir, self.directory):
                return
            if (await self._run(self._leases)).leases:
                log.info("network: %d container(s) still attached: keeping %s",
                         len(self._leases().leases), self.settings.bridge)
                return
            for fn, arg in ((_nft.delete_table, self.table),
                            (_netlink.delete_bridge, self.settings.bridge)):
                try:
                    await self._run(fn, arg)
                except Exception as e:
                    log.warning("network: removing %s: %s", arg, e)
            await self._run(self._remove_directory)
            self._bridge_ready = False
