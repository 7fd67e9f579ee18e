"""corrald's address book for its bridge: which container holds which address.

One `Ipam` per subnet (IPv4, and IPv6 when the daemon has ``subnet6``). Leases are kept in
one JSON file per subnet (``<root>/network/ipam.json``, ``ipam6.json``), rewritten atomically
(`write_atomic`: temp file, fsync, rename, fsync of the directory) *before* an address is
handed out, so that after a crash or a restart of the daemon the file still names every
address that a container may be using: nothing is ever handed out twice. A lease lives as
long as the container's network namespace, across restarts of the container and of the
daemon (an adopted container keeps its address); `release` drops it when the container is
stopped or removed, `retain` drops every lease but the named ones (start-up cleanup).

New addresses are taken round-robin after the last one handed out, as CNI's host-local
does, so that a freed address is not reused at once (a peer's ARP cache or an open
connection might still point at it).

Pure logic and one file: no netlink. Not thread-safe by itself; `_network` serialises the
calls.

Example:
    >>> ipam = Ipam("/tmp/ipam-doc.json", "10.77.0.0/29")  # doctest: +SKIP
    >>> ipam.allocate("web"), ipam.allocate("db"), ipam.gateway  # doctest: +SKIP
    ('10.77.0.2', '10.77.0.3', '10.77.0.1')
"""

from __future__ import annotations

import ipaddress
import json
import os

from corral.runtime._state import write_atomic

__all__ = ["AddressError", "Ipam"]


class AddressError(Exception):
    """No address can be given: the subnet is full, or a fixed address is taken or outside."""


class Ipam:
    """The leases of one subnet, persisted in `path`.

    Args:
        path: the JSON file (created on the first lease).
        subnet: the bridge's IPv4 or IPv6 subnet; its first host address is the gateway.

    A file written for another subnet is not trusted: its leases are dropped (the
    daemon's settings changed, and the start-up cleanup removes those containers'
    networks anyway).
    """

    def __init__(self, path: str, subnet: str) -> None:
        self.path = path
        self.subnet = ipaddress.ip_network(subnet)
        self.leases: dict[str, str] = {}
        self._last = int(self.subnet.network_address) + 1
        self._load()

    @property
    def gateway(self) -> str:
        """The bridge's own address: the first host address of the subnet."""
        return str(self.subnet.network_address + 1)

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except ValueError:
            # A torn file cannot happen (atomic writes); an edited one is not trusted.
            return
        if data.get("subnet") != str(self.subnet):
            return
        leases = data.get("leases", {})
        self.leases = {str(k): str(v) for k, v in leases.items()}
        self._last = int(ipaddress.ip_address(data.get("last", self.gateway)))

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        data = {"subnet": str(self.subnet), "last": self._str(self._last),
                "leases": dict(sorted(self.leases.items()))}
        write_atomic(self.path, json.dumps(data, indent=1).encode(), 0o600)

    def _str(self, n: int) -> str:
        return str(ipaddress.ip_address(n) if self.subnet.version == 4
                   else ipaddress.IPv6Address(n))

    def get(self, name: str) -> str | None:
        """The address leased to `name`, or None."""
        return self.leases.get(name)

    def allocate(self, name: str, want: str | None = None) -> str:
        """Lease an address to `name` and persist it; an existing lease is returned as is.

        Args:
            name: the container.
            want: a fixed address (``network.ip``), or None for the next free one.

        Raises:
            AddressError: `want` is outside the subnet, is the gateway, the network or the
                broadcast address, or is leased to another container; or no address is free.
        """
        if want is not None:
            want = self._str(int(ipaddress.ip_address(want)))
        have = self.leases.get(name)
        if have is not None and (want is None or want == have):
            return have
        taken = {v for k, v in self.leases.items() if k != name}
        if want is not None:
            addr = ipaddress.ip_address(want)
            if addr not in self.subnet or addr in (self.subnet.network_address,
                                                    self.subnet.broadcast_address):
                raise AddressError(f"{want} is not a host address of the subnet {self.subnet}")
            if want == self.gateway:
                raise AddressError(f"{want} is the bridge's own address (the gateway)")
            if want in taken:
                owner = next(k for k, v in self.leases.items() if v == want)
                raise AddressError(f"{want} is already leased to {owner!r}")
            chosen = want
        else:
            first = int(self.subnet.network_address) + 2
            last = int(self.subnet.broadcast_address) - 1
            span = last - first + 1
            start = self._last + 1
            chosen = ""
            for i in range(span):
                n = first + (start - first + i) % span
                cand = self._str(n)
                if cand not in taken:
                    chosen = cand
                    self._last = n
                    break
            if not chosen:
                raise AddressError(f"no free address left in {self.subnet}")
        self.leases[name] = chosen
        self._save()
        return chosen

    def release(self, name: str) -> str | None:
        """Drop `name`'s lease (persisted); returns the address it had."""
        addr = self.leases.pop(name, None)
        if addr is not None:
            self._save()
        return addr

    def retain(self, keep: set[str]) -> list[str]:
        """Drop every lease whose container is not in `keep`; returns the dropped names."""
        gone = sorted(set(self.leases) - keep)
        for name in gone:
            del self.leases[name]
        if gone:
            self._save()
        return gone
