"""corrald's network settings and address book: ``[network]`` in container files and in
corrald.toml, to_oci for the modes, the OCI changes of a bridge container, and `Ipam`.
Pure logic: no root, no netlink."""

from __future__ import annotations

import json

import pytest
from corral.runtime._spec import validate
from corral.supervisor import BridgeSettings, ConfigError, load_container, load_daemon, to_oci
from corral.supervisor._config import NetworkSpec, PortSpec
from corral.supervisor._ipam import AddressError, Ipam
from corral.supervisor._netlink import host_veth
from corral.supervisor._network import Attachment, oci_changes
from corral.supervisor._nft import table_name

MIN = '[container]\nrootfs = "/srv/rootfs"\ncommand = ["/bin/true"]\n'


def write(tmp_path, text, name="web.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, network):
    return load_container(write(tmp_path, MIN + "[network]\n" + network))


# -- container files -----------------------------------------------------------------------


def test_default_mode_is_none(tmp_path):
    spec = load_container(write(tmp_path, MIN))
    assert spec.network == NetworkSpec(mode="none", ports=(), ip=None)


def test_bridge_with_ports_and_ip(tmp_path):
    spec = load(tmp_path, 'mode = "bridge"\nip = "10.77.0.9"\nports = ['
                '"127.0.0.1:18080:8080/tcp", "8053:53/udp", "0.0.0.0:9000:9000"]\n')
    assert spec.network.mode == "bridge"
    assert spec.network.ip == "10.77.0.9"
    assert spec.network.ports == (
        PortSpec("127.0.0.1", 18080, 8080, "tcp"), PortSpec(None, 8053, 53, "udp"),
        PortSpec("0.0.0.0", 9000, 9000, "tcp"))


def test_same_host_port_for_tcp_and_udp(tmp_path):
    spec = load(tmp_path, 'mode = "bridge"\nports = ["53:53/tcp", "53:53/udp"]\n')
    assert [p.protocol for p in spec.network.ports] == ["tcp", "udp"]


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('mode = "nat"', "network.mode", "not a network mode"),
    ("mode = 1", "network.mode", "must be a string"),
    ('mode = "bridge"\nports = "80:80"', "network.ports", "must be an array"),
    ('mode = "bridge"\nports = ["80"]', "network.ports[0]", "HOST_PORT:CONTAINER_PORT"),
    ('mode = "bridge"\nports = ["1:2:3:4"]', "network.ports[0]", "HOST_PORT:CONTAINER_PORT"),
    ('mode = "bridge"\nports = ["0:80"]', "network.ports[0]", "not a host port"),
    ('mode = "bridge"\nports = ["80:70000"]', "network.ports[0]", "not a container port"),
    ('mode = "bridge"\nports = ["80:x"]', "network.ports[0]", "not a container port"),
    ('mode = "bridge"\nports = ["80:80/sctp"]', "network.ports[0]", "must be tcp or udp"),
    ('mode = "bridge"\nports = ["localhost:80:80"]', "network.ports[0]", "not an IPv4"),
    ('mode = "bridge"\nports = ["::1:80:80"]', "network.ports[0]", "HOST_PORT"),
    ('mode = "bridge"\nports = ["80:80", "127.0.0.1:80:81"]', "network.ports[1]",
     r"already published by network\.ports\[0\]"),
    ('mode = "bridge"\nip = "10.77.0.300"', "network.ip", "not an IPv4 address"),
    ('ports = ["80:80"]', "network.ports", 'only applies to mode "bridge"'),
    ('mode = "host"\nip = "10.77.0.2"', "network.ip", 'only applies to mode "bridge"'),
    ('mode = "bridge"\ndns = "1.1.1.1"', "network.dns", "unknown key"),
])
def test_bad_network_section(tmp_path, text, key, problem):
    path = write(tmp_path, MIN + "[network]\n" + text + "\n")
    with pytest.raises(ConfigError, match=problem) as exc:
        load_container(path)
    assert exc.value.file == str(path)
    assert exc.value.key == key


def test_network_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_container(write(tmp_path, 'network = "bridge"\n' + MIN))
    assert exc.value.key == "network"


# -- corrald.toml --------------------------------------------------------------------------


def test_daemon_network_defaults(tmp_path):
    assert load_daemon(None).network == BridgeSettings("corral0", "10.77.0.0/16")
    spec = load_daemon(write(tmp_path, '[network]\nbridge = "br-test"\nsubnet = "10.1.2.0/24"\n',
                             "corrald.toml"))
    assert spec.network == BridgeSettings("br-test", "10.1.2.0/24")
    six = load_daemon(write(tmp_path, '[network]\nsubnet6 = "fd77:1::/64"\n', "corrald.toml"))
    assert six.network == BridgeSettings(subnet6="fd77:1::/64")


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('bridge = "a-name-longer-than-15"', "network.bridge", "not an interface name"),
    ('bridge = "br/0"', "network.bridge", "not an interface name"),
    ('bridge = ""', "network.bridge", "not an interface name"),
    ('subnet = "10.1.2.3/24"', "network.subnet", "not an IPv4 subnet"),
    ('subnet = "10.1.2.0"', "network.subnet", "prefix length"),
    ('subnet = "10.1.2.0/31"', "network.subnet", "prefix length"),
    ('subnet = "fd00::/64"', "network.subnet", "not an IPv4 subnet"),
    ('gateway = "10.1.2.1"', "network.gateway", "unknown key"),
    ('subnet6 = "10.1.2.0/24"', "network.subnet6", "not an IPv6 subnet"),
    ('subnet6 = "fd77::1/64"', "network.subnet6", "not an IPv6 subnet"),
    ('subnet6 = "fd77::/32"', "network.subnet6", "prefix length"),
    ('subnet6 = "fd77::"', "network.subnet6", "prefix length"),
])
def test_daemon_bad_network(tmp_path, text, key, problem):
    path = write(tmp_path, "[network]\n" + text + "\n", "corrald.toml")
    with pytest.raises(ConfigError, match=problem) as exc:
        load_daemon(path)
    assert exc.value.file == str(path)
    assert exc.value.key == key


# -- to the OCI config ---------------------------------------------------------------------


def _net_namespaces(cfg):
    return [ns for ns in cfg["linux"]["namespaces"] if ns["type"] == "network"]


def test_modes_in_oci(tmp_path):
    none = to_oci(load_container(write(tmp_path, MIN)))
    assert _net_namespaces(none) == [{"type": "network"}]
    host = to_oci(load(tmp_path, 'mode = "host"\n'))
    validate(host)
    assert _net_namespaces(host) == []
    assert {ns["type"] for ns in host["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount"}


def test_bridge_joins_the_namespace_and_mounts_the_files(tmp_path):
    cfg = to_oci(load(tmp_path, 'mode = "bridge"\n'))
    netns = tmp_path / "netns-web"
    netns.touch()  # validate() checks that a namespace path exists
    att = Attachment("web", "10.77.0.2", str(netns), "/run/corral/network/files/web/hosts",
                     "/run/corral/network/files/web/resolv.conf")
    oci_changes(cfg, att)
    validate(cfg)
    assert _net_namespaces(cfg) == [{"type": "network", "path": att.netns}]
    mounts = {m["destination"]: m for m in cfg["mounts"]}
    assert mounts["/etc/hosts"]["source"] == att.hosts
    assert mounts["/etc/resolv.conf"]["source"] == att.resolv_conf
    assert "ro" in mounts["/etc/hosts"]["options"]


def test_names_fit_the_kernel():
    name = "x" * 128
    assert len(host_veth("corral0", name)) == 14
    assert host_veth("corral0", name) != host_veth("corral1", name)
    assert table_name("br-test.0") == "corral_br_test_0"


# -- IPAM ----------------------------------------------------------------------------------


def test_ipam_round_robin_and_persisted(tmp_path):
    path = str(tmp_path / "net" / "ipam.json")
    ipam = Ipam(path, "10.9.0.0/29")  # hosts .1-.6; .1 is the gateway
    assert ipam.gateway == "10.9.0.1"
    assert [ipam.allocate(n) for n in "abc"] == ["10.9.0.2", "10.9.0.3", "10.9.0.4"]
    assert ipam.allocate("a") == "10.9.0.2"  # an existing lease is kept
    assert ipam.release("b") == "10.9.0.3"
    # A freed address is not reused at once: the next one after the last handed out.
    assert ipam.allocate("d") == "10.9.0.5"
    again = Ipam(path, "10.9.0.0/29")  # a daemon restart reads the same leases
    assert again.leases == {"a": "10.9.0.2", "c": "10.9.0.4", "d": "10.9.0.5"}
    assert again.allocate("e") == "10.9.0.6"
    assert again.allocate("f") == "10.9.0.3"  # wrapped around to the freed one
    with pytest.raises(AddressError, match="no free address"):
        again.allocate("g")
    data = json.loads((tmp_path / "net" / "ipam.json").read_text())
    assert data["subnet"] == "10.9.0.0/29"
    assert set(data["leases"]) == set("acdef")


def test_ipam_never_hands_out_an_address_twice(tmp_path):
    path = str(tmp_path / "ipam.json")
    seen: dict[str, str] = {}
    for round_ in range(3):  # three "daemon restarts", each adding and freeing leases
        ipam = Ipam(path, "10.9.0.0/28")
        for i in range(4):
            name = f"c{round_}-{i}"
            addr = ipam.allocate(name)
            assert addr not in set(ipam.leases.values()) - {addr} | {ipam.gateway}
            seen[name] = addr
        ipam.release(f"c{round_}-0")
        assert len(set(ipam.leases.values())) == len(ipam.leases)


def test_ipam_fixed_addresses(tmp_path):
    ipam = Ipam(str(tmp_path / "ipam.json"), "10.9.0.0/24")
    assert ipam.allocate("web", "10.9.0.50") == "10.9.0.50"
    with pytest.raises(AddressError, match="already leased to 'web'"):
        ipam.allocate("db", "10.9.0.50")
    for bad, why in (("10.9.0.1", "gateway"), ("10.9.1.5", "not a host address"),
                     ("10.9.0.255", "not a host address"), ("10.9.0.0", "not a host address")):
        with pytest.raises(AddressError, match=why):
            ipam.allocate("db", bad)
    assert ipam.allocate("web", "10.9.0.51") == "10.9.0.51"  # a new fixed address moves it
    assert ipam.allocate("db") == "10.9.0.2"


def test_ipam_retain_and_other_subnet(tmp_path):
    path = str(tmp_path / "ipam.json")
    ipam = Ipam(path, "10.9.0.0/24")
    for n in ("a", "b", "c"):
        ipam.allocate(n)
    assert ipam.retain({"b"}) == ["a", "c"]
    assert Ipam(path, "10.9.0.0/24").leases == {"b": "10.9.0.3"}
    # Leases of another subnet (the settings changed) are not trusted.
    assert Ipam(path, "10.8.0.0/24").leases == {}


def test_ipam_ipv6(tmp_path):
    path = str(tmp_path / "ipam6.json")
    ipam = Ipam(path, "fd77:1::/64")
    assert ipam.gateway == "fd77:1::1"
    assert ipam.allocate("a") == "fd77:1::2"
    assert ipam.allocate("b", "FD77:1:0::00AA") == "fd77:1::aa"  # normalised
    with pytest.raises(AddressError, match="already leased"):
        ipam.allocate("c", "fd77:1::aa")
    with pytest.raises(AddressError, match="not a host address"):
        ipam.allocate("c", "10.0.0.1")
    assert Ipam(path, "fd77:1::/64").leases == {"a": "fd77:1::2", "b": "fd77:1::aa"}
    assert Ipam(path, "fd77:1::/64").allocate("c") == "fd77:1::3"
