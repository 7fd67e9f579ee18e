"""Blocking netlink work for corrald's bridge networks, with pyroute2 and no fork.

Every function here blocks: corrald calls them through ``trio.to_thread.run_sync``, and each
call opens its own ``IPRoute`` (pyroute2's sockets are not safe to share across threads).

What pyroute2 would fork for, and what is done instead (corrald never forks: anti-pattern 2):

- ``pyroute2.netns.create`` and ``IPRoute(netns=...)`` run a child process (0.9's
  ``ChildProcess``) to enter the namespace. Instead, `create_netns` runs in a fresh thread
  that unshares its own network namespace (a thread property), bind-mounts
  ``/proc/thread-self/ns/net`` onto a file, brings ``lo`` up and ends; `_in_netns` runs a
  function in a fresh thread that setns'd into a namespace, so that the ``IPRoute`` it opens
  there talks to that namespace. Those threads are never reused (anti-pattern 3: a trio
  worker thread left in another namespace would carry it into unrelated work).
- The veth's container end is created straight inside the namespace (``IFLA_NET_NS_FD`` in
  the peer's attributes), already named ``eth0``: it never appears on the host.

The host end's name is ``vc`` + 12 hex digits of a hash of bridge and container (the kernel
allows 15 characters; container names are longer), and its alias
(``corral/<bridge>/<name>``) says whose it is, so that `owned_links` finds them after a crash.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any, TypeVar

from corral.runtime import _linux as L

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["attach", "create_netns", "delete_bridge", "detach", "ensure_bridge",
           "host_veth", "owned_links", "remove_netns"]

T = TypeVar("T")
CONTAINER_IFNAME = "eth0"
_IFA_F_NODAD = 0x02  # an address of ours on our own link: no duplicate detection delay
_AF_INET, _AF_INET6 = 2, 10


def _in_fresh_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a new thread and return its result (or raise its exception).

    Why a new thread each time: `fn` changes the thread's network namespace, and a thread
    that is thrown away cannot carry that namespace into anything else.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    th = threading.Thread(target=run, name="corrald-netns", daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _in_netns(path: str, fn: Callable[[Any], T]) -> T:
    """`fn(ipr)` with an IPRoute opened inside the network namespace bound at `path`."""
    def run() -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.setns(fd, L.CLONE_NEWNET)
        finally:
            os.close(fd)
        with _iproute() as ipr:
            return fn(ipr)

    return _in_fresh_thread(run)


def host_veth(bridge: str, name: str) -> str:
    """The host end's interface name for container `name` on `bridge` (15 characters)."""
    return "vc" + hashlib.sha256(f"{bridge}/{name}".encode()).hexdigest()[:12]


def _alias(bridge: str, name: str) -> str:
    return f"corral/{bridge}/{name}"


# --- namespaces ---------------------------------------------------------------------------


def create_netns(path: str) -> None:
    """A new network namespace bound at `path`, with ``lo`` up (no fork: a fresh thread).

    Raises:
        FileExistsError: `path` exists (a namespace is bound there already).
    """
    def run() -> None:
        L.unshare(L.CLONE_NEWNET)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        try:
            L.mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, None,
                    L.MS_BIND)
        except BaseException:
            os.unlink(path)
            raise
        with _iproute() as ipr:
            ipr.link("set", index=1, state="up")

    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _in_fresh_thread(run)


def remove_netns(path: str) -> bool:
    """Unmount and remove the namespace file at `path`; False when there was none."""
    try:
        L.umount2(path, L.MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# --- the bridge ---------------------------------------------------------------------------


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def ensure_bridge(bridge: str, gateway: str, prefixlen: int, gateway6: str | None = None,
                  prefixlen6: int = 64) -> None:
    """Create `bridge` with the gateway address(es), up, if it is not there yet.

    ``route_localnet`` lets packets from 127.0.0.0/8 (a published port used on 127.0.0.1,
    masqueraded by `_nft`) be routed out of the bridge; it changes nothing for other
    interfaces.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            try:
                ipr.link("add", ifname=bridge, kind="bridge")
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            found = ipr.link_lookup(ifname=bridge)
        index = found[0]
        have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        if (gateway, prefixlen) not in have:
            ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen)
        if gateway6 is not None and (gateway6, prefixlen6) not in have:
            ipr.addr("add", index=index, address=gateway6, prefixlen=prefixlen6,
                     flags=_IFA_F_NODAD)
        ipr.link("set", index=index, state="up")
    _write_sysctl(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet", "1")


def delete_bridge(bridge: str) -> bool:
    """Delete `bridge`; False when there was none."""
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return False
        ipr.link("del", index=found[0])
    return True


# --- a container's veth -------------------------------------------------------------------


def attach(netns: str, bridge: str, name: str, address: str, prefixlen: int,
           gateway: str, address6: str | None = None, prefixlen6: int = 64,
           gateway6: str | None = None) -> str:
    """Give the namespace at `netns` an ``eth0`` on `bridge` with `address` (and
    `address6`), and a default route via `gateway` (and `gateway6`). Returns the host end's
    name.

    An old pair of the same name (a crash between create and configure) is deleted first.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    host = host_veth(bridge, name)
    with _iproute() as ipr:
        master = ipr.link_lookup(ifname=bridge)
        if not master:
            raise OSError(errno.ENODEV, f"bridge {bridge} does not exist")
        for index in ipr.link_lookup(ifname=host):
            ipr.link("del", index=index)
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ipr.link("add", ifname=host, kind="veth",
                     peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": fd})
        finally:
            os.close(fd)
        index = ipr.link_lookup(ifname=host)[0]
        try:
            ipr.link("set", index=index, ifalias=_alias(bridge, name))
            ipr.link("set", index=index, master=master[0], state="up")
        except NetlinkError:
            ipr.link("del", index=index)
            raise

    def configure(ipr: Any) -> None:
        eth = ipr.link_lookup(ifname=CONTAINER_IFNAME)[0]
        ipr.addr("add", index=eth, address=address, prefixlen=prefixlen)
        if address6 is not None:
            ipr.addr("add", index=eth, address=address6, prefixlen=prefixlen6,
                     flags=_IFA_F_NODAD)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=eth)
        if gateway6 is not None:
            ipr.route("add", dst="::/0", gateway=gateway6, oif=eth, family=_AF_INET6)

    try:
        _in_netns(netns, configure)
    except BaseException:
        detach(bridge, name)
        raise
    return host


def detach(bridge: str, name: str) -> bool:
    """Delete container `name`'s veth pair (the host end takes the other); False if none."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=host_veth(bridge, name))
        for index in found:
            try:
                ipr.link("del", index=index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
    return bool(found)


def owned_links(bridge: str) -> dict[str, str]:
    """corrald's veth host ends for `bridge`, by container name: ``{name: ifname}``."""
    prefix = _alias(bridge, "")
    out = {}
    with _iproute() as ipr:
        for link in ipr.get_links():
            alias = link.get("ifalias") or ""
            if alias.startswith(prefix):
                out[alias[len(prefix):]] = link.get("ifname")
    return out
