"""Published ports as nftables rules, sent over netlink with pyroute2 (no ``nft`` command).

Why netlink and not the ``nft`` command: corrald never forks (its trio worker threads make a
fork unsafe), and the ``nft`` binary would have to be run from the namespace helper, which
has other work. pyroute2 speaks nf_tables' netlink protocol; its high-level rule helpers
are thin, so the few expressions corrald needs are built here from the kernel's attributes
(``nft --debug=netlink`` prints the same ones).

corrald owns one table, ``ip corral_<bridge>`` (one per daemon, as the bridge is), and
touches no other table. It holds three NAT base chains:

- ``prerouting`` (hook prerouting, priority -100) and ``output`` (hook output, priority
  -100): per published port, ``[ip daddr HOST | fib daddr type local] meta l4proto P
  th dport HPORT dnat to CIP:CPORT`` with the comment ``corral:NAME``. The output chain is
  what makes a port reachable from the host itself (locally generated packets never pass
  prerouting).
- ``postrouting`` (hook postrouting, priority 100): ``ip saddr 127.0.0.0/8 oifname BRIDGE
  masquerade``, once per table. A connection to 127.0.0.1:HPORT keeps its loopback source
  after the DNAT; the container could not answer it, so it is masqueraded to the bridge's
  address (with ``route_localnet`` on the bridge, see `_netlink`), as netavark does.

Every rule of a container carries its comment, and `remove_ports` deletes the rules by
handle in one transaction; `delete_table` drops the table whole (daemon exit, start-up
cleanup). All calls are blocking: run them in a worker thread, one netlink socket per call.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._config import PortSpec

__all__ = ["add_ports", "delete_table", "ensure_table", "list_owners", "remove_ports",
           "table_name"]

NFPROTO_IPV4 = 2
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11
_NFT_MSG_NEWTABLE, _NFT_MSG_DELTABLE = 0, 2
_NFT_MSG_NEWCHAIN = 3
_NFT_MSG_NEWRULE, _NFT_MSG_GETRULE, _NFT_MSG_DELRULE = 6, 7, 8

_REG_1, _REG_2 = 1, 2
_PAYLOAD_NETWORK, _PAYLOAD_TRANSPORT = 1, 2
_META_L4PROTO, _META_OIFNAME = 16, 7
_NFT_NAT_DNAT = 1
_FIB_F_DADDR = 1 << 1
_RTN_LOCAL = 2
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_IFNAMSIZ = 16
COMMENT_PREFIX = "corral:"

_HOOKS = {"prerouting": (0, -100), "output": (3, -100), "postrouting": (4, 100)}


def table_name(bridge: str) -> str:
    """corrald's table for `bridge`: one per daemon, so two daemons never share rules."""
    return "corral_" + bridge.replace("-", "_").replace(".", "_")


# --- expressions (the kernel's NFTA_* attributes) -----------------------------------------


def _expr(name: str, **data: Any) -> dict[str, Any]:
    attrs = [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in data.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": attrs})]}


def _value(raw: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", raw)]}


def _cmp_eq(raw: bytes, reg: int = _REG_1) -> dict[str, Any]:
    return _expr("cmp", sreg=reg, op=0, data=_value(raw))


def _payload(base: int, offset: int, length: int) -> dict[str, Any]:
    return _expr("payload", dreg=_REG_1, base=base, offset=offset, len=length)


def _match_daddr(host_ip: str | None) -> list[dict[str, Any]]:
    """``ip daddr HOST``, or ``fib daddr type local`` (any address of this host)."""
    if host_ip is not None:
        return [_payload(_PAYLOAD_NETWORK, 16, 4),
                _cmp_eq(ipaddress.IPv4Address(host_ip).packed)]
    # pyroute2 encodes NFTA_FIB_RESULT as a flag set; {UNSPEC, OIF} is bits 0|1 = 3, the
    # value of NFT_FIB_RESULT_ADDRTYPE. The address type is a host-endian u32.
    return [_expr("fib", dreg=_REG_1, result={"NFT_FIB_RESULT_UNSPEC", "NFT_FIB_RESULT_OIF"},
                  flags=_FIB_F_DADDR),
            _cmp_eq(struct.pack("=I", _RTN_LOCAL))]


def _dnat_rule(port: PortSpec, container_ip: str) -> list[dict[str, Any]]:
    host_ip = port.host_ip if port.host_ip not in (None, "0.0.0.0") else None
    return [
        *_match_daddr(host_ip),
        _expr("meta", dreg=_REG_1, key=_META_L4PROTO),
        _cmp_eq(bytes([_PROTOCOLS[port.protocol]])),
        _payload(_PAYLOAD_TRANSPORT, 2, 2),
        _cmp_eq(struct.pack(">H", port.host_port)),
        _expr("immediate", dreg=_REG_1,
              data=_value(ipaddress.IPv4Address(container_ip).packed)),
        _expr("immediate", dreg=_REG_2, data=_value(struct.pack(">H", port.container_port))),
        _expr("nat", type=_NFT_NAT_DNAT, family=NFPROTO_IPV4, reg_addr_min=_REG_1,
              reg_proto_min=_REG_2),
    ]


def _masquerade_loopback(bridge: str) -> list[dict[str, Any]]:
    return [
        _payload(_PAYLOAD_NETWORK, 12, 4),
        _expr("bitwise", sreg=_REG_1, dreg=_REG_1, len=4, mask=_value(b"\xff\0\0\0"),
              xor=_value(b"\0\0\0\0")),
        _cmp_eq(b"\x7f\0\0\0"),
        _expr("meta", dreg=_REG_1, key=_META_OIFNAME),
        _cmp_eq(bridge.encode().ljust(_IFNAMSIZ, b"\0")),
        _expr("masq"),
    ]


# --- messages and transactions ------------------------------------------------------------


def _msg(cls: Any, msg_type: int, flags: int, **attrs: Any) -> Any:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

    msg = cls()
    msg["attrs"] = [[cls.name2nla(k), v] for k, v in attrs.items()]
    msg["header"]["type"] = (_NFNL_SUBSYS_NFTABLES << 8) | msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg["nfgen_family"] = NFPROTO_IPV4
    return msg


def _transaction(messages: Sequence[Any]) -> None:
    """Send `messages` as one nf_tables transaction: all of it is applied, or none."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
    from pyroute2.netlink.nfnetlink.nftsocket import NFTSocket

    def batch(msg_type: int) -> Any:
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = msg_type
        m["header"]["flags"] = NLM_F_REQUEST
        return m

    nft = NFTSocket(nfgen_family=NFPROTO_IPV4)
    try:
        nft.nlm_request_batch([batch(_NFNL_MSG_BATCH_BEGIN), *messages,
                               batch(_NFNL_MSG_BATCH_END)])
    finally:
        nft.close()


def _rules(table: str) -> list[tuple[str, int, str]]:
    """(chain, handle, comment) of every rule in `table`; [] when there is no table."""
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nftsocket import NFTSocket, nft_rule_msg

    nft = NFTSocket(nfgen_family=NFPROTO_IPV4)
    try:
        msg = nft_rule_msg()
        msg["attrs"] = [["NFTA_RULE_TABLE", table]]
        try:
            dump = nft.request_get(msg, _NFT_MSG_GETRULE, NLM_F_REQUEST | NLM_F_DUMP)
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return []
            raise
        out = []
        for m in dump:
            if m.get_attr("NFTA_RULE_TABLE") != table:
                continue
            comment = m.get_attr("NFTA_RULE_USERDATA")
            out.append((m.get_attr("NFTA_RULE_CHAIN"), m.get_attr("NFTA_RULE_HANDLE"),
                        comment if isinstance(comment, str) else ""))
        return out
    finally:
        nft.close()


# --- what corrald calls -------------------------------------------------------------------


def ensure_table(table: str, bridge: str) -> None:
    """Create corrald's table and chains if missing, and the loopback masquerade once."""
    from pyroute2.netlink import NLM_F_CREATE
    from pyroute2.netlink.nfnetlink.nftsocket import nft_chain_msg, nft_rule_msg, nft_table_msg

    have = {c for c, _, _ in _rules(table)}
    msgs = [_msg(nft_table_msg, _NFT_MSG_NEWTABLE, NLM_F_CREATE, NFTA_TABLE_NAME=table)]
    for chain, (hook, priority) in _HOOKS.items():
        msgs.append(_msg(nft_chain_msg, _NFT_MSG_NEWCHAIN, NLM_F_CREATE,
                         NFTA_CHAIN_TABLE=table, NFTA_CHAIN_NAME=chain,
                         NFTA_CHAIN_HOOK={"attrs": [["NFTA_HOOK_HOOKNUM", hook],
                                                    ["NFTA_HOOK_PRIORITY", priority]]},
                         NFTA_CHAIN_TYPE="nat"))
    if "postrouting" not in have:
        msgs.append(_msg(nft_rule_msg, _NFT_MSG_NEWRULE, NLM_F_CREATE,
                         NFTA_RULE_TABLE=table, NFTA_RULE_CHAIN="postrouting",
                         NFTA_RULE_EXPRESSIONS=_masquerade_loopback(bridge),
                         NFTA_RULE_USERDATA="corral"))
    _transaction(msgs)


def add_ports(table: str, name: str, container_ip: str, ports: Iterable[PortSpec]) -> None:
    """Publish `ports` of container `name` (at `container_ip`) in one transaction."""
    from pyroute2.netlink import NLM_F_APPEND, NLM_F_CREATE
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

    msgs = []
    for port in ports:
        for chain in ("prerouting", "output"):
            msgs.append(_msg(nft_rule_msg, _NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND,
                             NFTA_RULE_TABLE=table, NFTA_RULE_CHAIN=chain,
                             NFTA_RULE_EXPRESSIONS=_dnat_rule(port, container_ip),
                             NFTA_RULE_USERDATA=COMMENT_PREFIX + name))
    if msgs:
        _transaction(msgs)


def remove_ports(table: str, names: Iterable[str]) -> int:
    """Delete every rule of the containers `names`; returns how many were deleted."""
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

    comments = {COMMENT_PREFIX + n for n in names}
    msgs = [_msg(nft_rule_msg, _NFT_MSG_DELRULE, 0, NFTA_RULE_TABLE=table,
                 NFTA_RULE_CHAIN=chain, NFTA_RULE_HANDLE=handle)
            for chain, handle, comment in _rules(table) if comment in comments]
    if msgs:
        _transaction(msgs)
    return len(msgs)


def list_owners(table: str) -> set[str]:
    """The container names that have rules in `table`."""
    return {c.removeprefix(COMMENT_PREFIX) for _, _, c in _rules(table)
            if c.startswith(COMMENT_PREFIX)}


def delete_table(table: str) -> bool:
    """Drop `table` with all its chains and rules; False when there was none."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nftsocket import nft_table_msg

    try:
        _transaction([_msg(nft_table_msg, _NFT_MSG_DELTABLE, 0, NFTA_TABLE_NAME=table)])
    except NetlinkError as e:
        if e.code == errno.ENOENT:
            return False
        raise
    return True
