"""corrald's configuration: one TOML file per container, and the daemon's own corrald.toml.

Every file is checked completely before anything runs: an unknown section or key, a wrong
type or an impossible value is a `ConfigError` naming the file and the dotted key
(``web.toml: restart.backoff_max: ...``), never a guess (anti-pattern 9). `load_dir` reports a
bad file and skips it, so one typo does not keep the other containers down.

The values are `attrs.frozen` classes, so that a reload can compare the old and the new spec
of a container with ``==`` (`plan_reload`). Defaults follow Docker's restart backoff (100 ms,
x2, capped at 1 min, reset after a 10 s run), Docker's stop (SIGTERM, 10 s, then SIGKILL) and
systemd's start limit (5 starts in 10 s).

A container file::

    [container]
    rootfs = "/srv/web/rootfs"          # or: bundle = "/srv/web" (an OCI bundle)
    command = ["/bin/httpd", "-f"]      # required with rootfs; with bundle, overrides args
    env = { PORT = "8080" }
    cwd = "/"
    user = "1000:1000"
    hostname = "web"
    mounts = [{ source = "/srv/data", destination = "/data", readonly = true }]

    [resources]
    memory = "64M"
    pids = 100
    cpus = 0.5

    [restart]
    policy = "on-failure"
    max_retries = 5

    [stop]
    signal = "SIGINT"
    timeout = "30s"

    [logs]
    max_size = "10M"
    keep = 5

    [network]
    mode = "bridge"                     # "none" (the default), "host" or "bridge"
    ports = ["127.0.0.1:18080:8080/tcp"]
    ip = "10.77.0.10"                   # optional; from the daemon's subnet

corrald.toml may hold a ``[network]`` table (``bridge``, ``subnet``): see `BridgeSettings`.
"""

from __future__ import annotations

import copy
import grp
import ipaddress
import math
import os
import re
import signal
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ._units import ConfigError as ConfigError
from ._units import parse_duration, parse_size, show_value

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "BridgeSettings", "ConfigError", "ContainerSpec", "DaemonSpec", "LogSpec", "Mount",
    "NetworkSpec", "PortSpec", "ReloadPlan",
    "ResourceSpec", "RestartPolicy", "RestartSpec", "StopSpec", "User", "load_container",
    "load_daemon", "load_dir", "plan_reload", "to_oci", "validate_name",
]

RestartPolicy = Literal["no", "on-failure", "always", "unless-stopped"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("no", "on-failure", "always", "unless-stopped")
NetworkMode = Literal["none", "host", "bridge"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("none", "host", "bridge")

DEFAULT_DAEMON_CONFIG = "/etc/corral/corrald.toml"
DEFAULT_CONFIG_DIR = "/etc/corral/containers.d"
DEFAULT_ROOT = "/run/corral"
DEFAULT_LOG_DIR = "/var/log/corral"
SOCKET_NAME = "corrald.sock"

CPU_PERIOD = 100_000  # µs: the CFS period Docker uses for --cpus
_MIN_CPUS = 0.01  # the kernel refuses a CFS quota below 1000 µs
_MAX_ID = 2**32 - 2  # uid/gid: (uid_t)-1 means "unchanged" to the kernel
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, one for the NUL
_HOST_NAME_MAX = 64
_NAME_MAX = 128

# Docker's container-name rule: a letter or digit first (so no ".", ".." or hidden files),
# then letters, digits, "_", "." and "-".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_USER = re.compile(r"([0-9]+)(?::([0-9]+))?")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


# --- the values ---------------------------------------------------------------------------


@attrs.frozen
class Mount:
    """A bind mount from the host into the container (``container.mounts``)."""

    source: str
    destination: str
    readonly: bool = False


@attrs.frozen
class User:
    """The numeric user the process runs as (``container.user = "uid[:gid]"``).

    The group defaults to 0, as runc and Docker do when no ``/etc/passwd`` entry is read:
    corrald never reads the container's passwd file.
    """

    uid: int
    gid: int = 0


@attrs.frozen
class ResourceSpec:
    """``[resources]``: None means no limit.

    Attributes:
        memory: the memory limit in bytes.
        pids: the most tasks the container may have.
        cpus: CPUs' worth of time, as Docker's ``--cpus``: quota = cpus x 100 ms per 100 ms.
    """

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None


@attrs.frozen
class RestartSpec:
    """``[restart]``: when to restart, how fast, and when to give up.

    Attributes:
        policy: ``"no"`` (the default, as in Docker and systemd), ``"on-failure"``,
            ``"always"`` or ``"unless-stopped"``.
        max_retries: for on-failure, how many restarts in a row before the container stays
            exited; 0 is unlimited. The count resets after a run of ``reset_after``.
        success_exit_codes: the exit codes that are not failures (sorted, no duplicates).
        backoff_initial: the first delay, in seconds (Docker: 100 ms).
        backoff_factor: each further delay is this times the last (Docker: 2).
        backoff_max: the cap on the delay, jitter included (Docker: 1 min).
        backoff_jitter: each delay moves by up to this fraction either way, so that many
            containers failing together do not restart in lockstep.
        reset_after: a run this long resets the backoff and the retry count (Docker: 10 s).
        start_limit_burst: at most this many starts ... (systemd StartLimitBurst=5)
        start_limit_interval: ... within this many seconds, or the container is fatal
            (systemd StartLimitIntervalSec=10s); 0 turns the limit off, as in systemd.
        in_place: a restart respawns the container in the namespaces and cgroup its last
            run kept (runtime/_respawn.py: a few ms); False deletes and creates it anew
            each time (~20 ms; a fresh /dev/shm and tmpfs mounts, as Docker's restart).
    """

    policy: RestartPolicy = "no"
    max_retries: int = 0
    success_exit_codes: tuple[int, ...] = (0,)
    backoff_initial: float = 0.1
    backoff_factor: float = 2.0
    backoff_max: float = 60.0
    backoff_jitter: float = 0.1
    reset_after: float = 10.0
    start_limit_burst: int = 5
    start_limit_interval: float = 10.0
    in_place: bool = True


@attrs.frozen
class StopSpec:
    """``[stop]``: the signal that asks the container to stop, and how long to wait before
    SIGKILL (Docker's defaults: SIGTERM, 10 s)."""

    signal: signal.Signals = signal.SIGTERM
    timeout: float = 10.0


@attrs.frozen
class LogSpec:
    """``[logs]``: rotate the log at ``max_size`` bytes, keeping ``keep`` rotated files
    besides the live one (0: none kept)."""

    max_size: int = 10 << 20
    keep: int = 5


@attrs.frozen
class PortSpec:
    """One published port (``network.ports``): ``[HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTO]``.

    Attributes:
        host_ip: the host address that takes the traffic (IPv4); None: every address of
            the host, as Docker's default.
        host_port, container_port: 1..65535.
        protocol: ``"tcp"`` (the default) or ``"udp"``.
    """

    host_ip: str | None
    host_port: int
    container_port: int
    protocol: Literal["tcp", "udp"] = "tcp"


@attrs.frozen
class NetworkSpec:
    """``[network]`` of a container file.

    Attributes:
        mode: ``"none"`` (the default: a network namespace of its own with only loopback,
            what corrald always gave), ``"host"`` (the host's network namespace) or
            ``"bridge"`` (a veth on the daemon's bridge, an address from its subnet, the
            other bridge containers by name in /etc/hosts).
        ports: published ports (bridge mode only).
        ip: a fixed IPv4 address from the daemon's subnet (bridge mode only); None: the
            next free one.
    """

    mode: NetworkMode = "none"
    ports: tuple[PortSpec, ...] = ()
    ip: str | None = None


@attrs.frozen
class ContainerSpec:
    """One container file, checked: what corrald runs under the file's name.

    Exactly one of `rootfs` and `bundle` is set. None means "not given": `to_oci` then keeps
    the bundle's own value, or the default for a rootfs.

    Attributes:
        name: the file's stem, a valid container id.
        rootfs: an absolute root filesystem directory; corrald writes the OCI config.
        bundle: an absolute OCI bundle directory with its own config.json.
        command: the process's args (required with rootfs).
        env: ``(KEY, VALUE)`` pairs, sorted by key.
        cwd: an absolute working directory.
        user: the numeric user and group.
        hostname: the UTS hostname (a rootfs container defaults to its name).
        mounts: bind mounts, in order.
        resources, restart, stop, logs, network: the other sections, with their defaults
            when absent.
        source: the file it was read from; not part of equality, so that moving the config
            directory does not restart everything.
    """

    name: str
    rootfs: str | None = None
    bundle: str | None = None
    command: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    user: User | None = None
    hostname: str | None = None
    mounts: tuple[Mount, ...] = ()
    resources: ResourceSpec = ResourceSpec()
    restart: RestartSpec = RestartSpec()
    stop: StopSpec = StopSpec()
    logs: LogSpec = LogSpec()
    network: NetworkSpec = NetworkSpec()
    source: str = attrs.field(default="", eq=False)


@attrs.frozen
class BridgeSettings:
    """corrald.toml's ``[network]``: the one bridge of this daemon.

    Attributes:
        bridge: the bridge's interface name (at most 15 characters); also names corrald's
            nftables table (``ip corral_<bridge>``), so two daemons need two bridges.
        subnet: the IPv4 subnet of the bridge; its first address is the bridge's (the
            containers' gateway), the others are handed out by corrald's IPAM.
        subnet6: an IPv6 subnet (e.g. a ULA ``fd77::/64``) for the bridge and the
            containers as well, or None (the default): IPv4 only.
    """

    bridge: str = "corral0"
    subnet: str = "10.77.0.0/16"
    subnet6: str | None = None


@attrs.frozen
class DaemonSpec:
    """corrald.toml (top-level keys) with the command-line flags applied over it.

    Attributes:
        config_dir: the directory of container files.
        root: the runtime's state root.
        log_dir: where container logs go.
        socket: the control socket; defaults to ``ROOT/corrald.sock``.
        socket_group: a group name or gid allowed on the socket besides root, or None.
        live_restore: leave containers running when corrald exits, and adopt them again.
        network: the bridge settings (``[network]``).
    """

    config_dir: str = DEFAULT_CONFIG_DIR
    root: str = DEFAULT_ROOT
    log_dir: str = DEFAULT_LOG_DIR
    socket: str = os.path.join(DEFAULT_ROOT, SOCKET_NAME)
    socket_group: str | int | None = None
    live_restore: bool = False
    network: BridgeSettings = BridgeSettings()


@attrs.frozen
class ReloadPlan:
    """What a reload does, by container name (each tuple sorted).

    Attributes:
        added: new files: start them.
        removed: files gone: stop them.
        changed: specs that differ: restart them with the new spec.
        unchanged: leave them alone.
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the log, e.g. ``"start db; stop old; restart web; keep api"``."""
        parts = [f"{verb} {', '.join(names)}" for verb, names in (
            ("start", self.added), ("stop", self.removed), ("restart", self.changed),
            ("keep", self.unchanged)) if names]
        return "; ".join(parts) if parts else "nothing configured"


# --- checking one value -------------------------------------------------------------------


class _Section:
    """A TOML table being read: refuses unknown keys up front, then hands out checked values.

    Every error names `file` and the dotted key under `prefix`.
    """

    def __init__(self, file: str, prefix: str, table: object, keys: Mapping[str, object]
                 ) -> None:
        if not isinstance(table, dict):
            raise ConfigError(file, prefix.rstrip("."), f"must be a table, not "
                              f"{show_value(table)}")
        for key in table:
            if key not in keys:
                raise ConfigError(file, prefix + key, f"unknown key (known keys: "
                                  f"{', '.join(keys)})")
        self.file, self.prefix, self.table = file, prefix, table

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return name in self.table

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.prefix + name, problem)

    def get(self, name: str, check: Callable[[object, str, str], Any], default: Any) -> Any:
        """`check(value, file, key)` of the key's value, or `default` when it is absent."""
        if name not in self.table:
            return default
        return check(self.table[name], self.file, self.prefix + name)


def _str(value: object, file: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(file, key, f"must be a string, not {show_value(value)}")
    if "\0" in value:
        raise ConfigError(file, key, "must not contain a NUL character")
    return value


def _abs_path(value: object, file: str, key: str) -> str:
    path = _str(value, file, key)
    if not path.startswith("/"):
        raise ConfigError(file, key, f"{path!r} must be an absolute path")
    return path


def _bool(value: object, file: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(file, key, f"must be true or false, not {show_value(value)}")
    return value


def _int(lo: int, hi: int | None = None) -> Callable[[object, str, str], int]:
    def check(value: object, file: str, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(file, key, f"must be an integer, not {show_value(value)}")
        if value < lo or (hi is not None and value > hi):
            limits = f"at least {lo}" if hi is None else f"in {lo}..{hi}"
            raise ConfigError(file, key, f"{value} is out of range: must be {limits}")
        return value
    return check


def _number(value: object, file: str, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(file, key, f"must be a number, not {show_value(value)}")
    if not math.isfinite(value):
        raise ConfigError(file, key, f"{value} is not a finite number")
    return float(value)


def _positive_size(value: object, file: str, key: str) -> int:
    size = parse_size(value, file, key)
    if size == 0:
        raise ConfigError(file, key, "must be more than 0 bytes")
    return size


# --- the sections of a container file -----------------------------------------------------

_CONTAINER_KEYS = dict.fromkeys(
    ("rootfs", "bundle", "command", "env", "cwd", "user", "hostname", "mounts"))
_RESOURCE_KEYS = dict.fromkeys(("memory", "pids", "cpus"))
_RESTART_KEYS = dict.fromkeys(attrs.fields_dict(RestartSpec))
_STOP_KEYS = dict.fromkeys(("signal", "timeout"))
_LOG_KEYS = dict.fromkeys(("max_size", "keep"))
_NETWORK_KEYS = dict.fromkeys(("mode", "ports", "ip"))
_SECTIONS = dict.fromkeys(("container", "resources", "restart", "stop", "logs", "network"))


def _command(value: object, file: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(file, key, f"must be an array of strings, not {show_value(value)}")
    if not value:
        raise ConfigError(file, key, "must not be empty")
    args = tuple(_str(arg, file, f"{key}[{i}]") for i, arg in enumerate(value))
    if not args[0]:
        raise ConfigError(file, f"{key}[0]", "the program must not be empty")
    return args


def _env(value: object, file: str, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(file, key, f"must be a table of strings like {{ PORT = \"80\" }}, "
                          f"not {show_value(value)}")
    pairs = []
    for name, val in value.items():
        if not name or "=" in name or "\0" in name:
            raise ConfigError(file, f"{key}.{name}", "is not a valid variable name")
        pairs.append((name, _str(val, file, f"{key}.{name}")))
    return tuple(sorted(pairs))


def _user(value: object, file: str, key: str) -> User:
    text = _str(value, file, key)
    m = _USER.fullmatch(text)
    if m is None:
        raise ConfigError(file, key, f"{text!r} must be numeric \"uid\" or \"uid:gid\" (user "
                          "names are not looked up)")
    uid, gid = int(m.group(1)), int(m.group(2) or 0)
    if uid > _MAX_ID or gid > _MAX_ID:
        raise ConfigError(file, key, f"{text!r}: ids must be in 0..{_MAX_ID}")
    return User(uid, gid)


def _hostname(value: object, file: str, key: str) -> str:
    text = _str(value, file, key)
    if len(text) > _HOST_NAME_MAX or not _HOSTNAME.fullmatch(text):
        raise ConfigError(file, key, f"{text!r} is not a hostname (at most {_HOST_NAME_MAX} "
                          "characters: letters, digits, '-' inside, labels split by '.')")
    return text


def _destination(value: object, file: str, key: str) -> str:
    path = _abs_path(value, file, key)
    if ".." in path.split("/"):
        raise ConfigError(file, key, f"{path!r} must not contain '..'")
    if os.path.normpath(path) == "/":
        raise ConfigError(file, key, "cannot be / (the root is container.rootfs)")
    return path


def _mounts(value: object, file: str, key: str) -> tuple[Mount, ...]:
    if not isinstance(value, list):
        raise ConfigError(file, key, f"must be an array of tables, not {show_value(value)}")
    mounts: list[Mount] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        sec = _Section(file, f"{key}[{i}].", item, dict.fromkeys(
            ("source", "destination", "readonly")))
        for required in ("source", "destination"):
            if not sec.has(required):
                raise sec.error(required, "is required")
        mount = Mount(source=sec.get("source", _abs_path, None),
                      destination=sec.get("destination", _destination, None),
                      readonly=sec.get("readonly", _bool, False))
        where = os.path.normpath(mount.destination)
        if where in seen:
            raise sec.error("destination", f"{mount.destination} is already the destination "
                            f"of {key}[{seen[where]}]")
        seen[where] = i
        mounts.append(mount)
    return tuple(mounts)


def _resources(file: str, table: object) -> ResourceSpec:
    sec = _Section(file, "resources.", table, _RESOURCE_KEYS)
    cpus = sec.get("cpus", _number, None)
    if cpus is not None and cpus < _MIN_CPUS:
        raise sec.error("cpus", f"{cpus} is too small: must be at least {_MIN_CPUS} (the "
                        "kernel's smallest CPU quota is 1 ms per 100 ms)")
    return ResourceSpec(memory=sec.get("memory", _positive_size, None),
                        pids=sec.get("pids", _int(1), None), cpus=cpus)


def _policy(value: object, file: str, key: str) -> RestartPolicy:
    text = _str(value, file, key)
    if text not in RESTART_POLICIES:
        raise ConfigError(file, key, f"{text!r} is not a restart policy (one of "
                          f"{', '.join(repr(p) for p in RESTART_POLICIES)})")
    return text


def _exit_codes(value: object, file: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ConfigError(file, key, f"must be an array of exit codes, not {show_value(value)}")
    code = _int(0, 255)
    return tuple(sorted({code(v, file, f"{key}[{i}]") for i, v in enumerate(value)}))


def _restart(file: str, table: object) -> RestartSpec:
    sec = _Section(file, "restart.", table, _RESTART_KEYS)
    d = RestartSpec()
    spec = RestartSpec(
        policy=sec.get("policy", _policy, d.policy),
        max_retries=sec.get("max_retries", _int(0), d.max_retries),
        success_exit_codes=sec.get("success_exit_codes", _exit_codes, d.success_exit_codes),
        backoff_initial=sec.get("backoff_initial", parse_duration, d.backoff_initial),
        backoff_factor=sec.get("backoff_factor", _number, d.backoff_factor),
        backoff_max=sec.get("backoff_max", parse_duration, d.backoff_max),
        backoff_jitter=sec.get("backoff_jitter", _number, d.backoff_jitter),
        reset_after=sec.get("reset_after", parse_duration, d.reset_after),
        start_limit_burst=sec.get("start_limit_burst", _int(1), d.start_limit_burst),
        start_limit_interval=sec.get("start_limit_interval", parse_duration,
                                     d.start_limit_interval),
        in_place=sec.get("in_place", _bool, d.in_place),
    )
    if spec.max_retries and spec.policy != "on-failure":
        # Docker refuses this too: the count would silently do nothing.
        raise sec.error("max_retries", f"only applies to policy \"on-failure\", not "
                        f"{spec.policy!r}")
    if spec.backoff_factor < 1:
        raise sec.error("backoff_factor", f"{spec.backoff_factor} must be at least 1 (a "
                        "backoff that shrinks restarts ever faster)")
    if not 0 <= spec.backoff_jitter < 1:
        raise sec.error("backoff_jitter", f"{spec.backoff_jitter} must be in [0, 1)")
    if spec.backoff_max < spec.backoff_initial:
        raise sec.error("backoff_max", f"{spec.backoff_max:g}s is less than backoff_initial "
                        f"({spec.backoff_initial:g}s)")
    return spec


def _signal(value: object, file: str, key: str) -> signal.Signals:
    text = _str(value, file, key)
    name = text.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__:
        # Numbers are refused: they differ between architectures (SIGUSR1 is 10 or 30).
        raise ConfigError(file, key, f"{text!r} is not a signal name (like \"SIGTERM\", "
                          "\"SIGINT\" or \"SIGQUIT\")")
    return signal.Signals[name]


def _stop(file: str, table: object) -> StopSpec:
    sec = _Section(file, "stop.", table, _STOP_KEYS)
    return StopSpec(signal=sec.get("signal", _signal, StopSpec().signal),
                    timeout=sec.get("timeout", parse_duration, StopSpec().timeout))


def _logs(file: str, table: object) -> LogSpec:
    sec = _Section(file, "logs.", table, _LOG_KEYS)
    return LogSpec(max_size=sec.get("max_size", _positive_size, LogSpec().max_size),
                   keep=sec.get("keep", _int(0), LogSpec().keep))


def _ipv4(value: object, file: str, key: str) -> str:
    text = _str(value, file, key)
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(file, key, f"{text!r} is not an IPv4 address") from None


def _port_number(text: str, entry: str, file: str, key: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(file, key, f"{entry!r}: {text!r} is not a {what} port (1..65535)")
    return int(text)


def _port(value: object, file: str, key: str) -> PortSpec:
    text = _str(value, file, key)
    rest, _, proto = text.partition("/")
    if proto not in ("", "tcp", "udp"):
        raise ConfigError(file, key, f"{text!r}: protocol {proto!r} must be tcp or udp")
    parts = rest.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(file, key, f"{text!r} must be \"[HOST_IP:]HOST_PORT:CONTAINER_PORT"
                          "[/tcp|udp]\", like \"127.0.0.1:8080:80\"")
    host_ip = _ipv4(parts[0], file, key) if len(parts) == 3 else None
    return PortSpec(host_ip=host_ip,
                    host_port=_port_number(parts[-2], text, file, key, "host"),
                    container_port=_port_number(parts[-1], text, file, key, "container"),
                    protocol="udp" if proto == "udp" else "tcp")


def _ports(value: object, file: str, key: str) -> tuple[PortSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(file, key, f"must be an array of strings like "
                          f"\"127.0.0.1:8080:80/tcp\", not {show_value(value)}")
    ports: list[PortSpec] = []
    for i, item in enumerate(value):
        port = _port(item, file, f"{key}[{i}]")
        for j, other in enumerate(ports):
            if (other.host_port, other.protocol) == (port.host_port, port.protocol) and (
                    None in (other.host_ip, port.host_ip) or other.host_ip == port.host_ip):
                raise ConfigError(file, f"{key}[{i}]", f"host port {port.host_port}/"
                                  f"{port.protocol} is already published by {key}[{j}]")
        ports.append(port)
    return tuple(ports)


def _mode(value: object, file: str, key: str) -> NetworkMode:
    text = _str(value, file, key)
    if text not in NETWORK_MODES:
        raise ConfigError(file, key, f"{text!r} is not a network mode (one of "
                          f"{', '.join(repr(m) for m in NETWORK_MODES)})")
    return text


def _network(file: str, table: object) -> NetworkSpec:
    sec = _Section(file, "network.", table, _NETWORK_KEYS)
    spec = NetworkSpec(mode=sec.get("mode", _mode, "none"), ports=sec.get("ports", _ports, ()),
                       ip=sec.get("ip", _ipv4, None))
    if spec.mode != "bridge":
        for key in ("ports", "ip"):
            if sec.has(key):
                raise sec.error(key, f"only applies to mode \"bridge\", not {spec.mode!r}")
    return spec


def _container(file: str, name: str, doc: dict[str, Any]) -> ContainerSpec:
    for section, value in doc.items():
        if section not in _SECTIONS:
            what = "unknown section" if isinstance(value, dict) else "a key outside a section"
            raise ConfigError(file, section, f"{what} (known sections: "
                              f"{', '.join(_SECTIONS)})")
    if "container" not in doc:
        raise ConfigError(file, "container", "the [container] section is required")
    sec = _Section(file, "container.", doc["container"], _CONTAINER_KEYS)
    rootfs = sec.get("rootfs", _abs_path, None)
    bundle = sec.get("bundle", _abs_path, None)
    if rootfs is not None and bundle is not None:
        raise sec.error("bundle", "cannot be set together with container.rootfs (set "
                        "exactly one)")
    if rootfs is None and bundle is None:
        raise sec.error("rootfs", "is required, or container.bundle (set exactly one)")
    command = sec.get("command", _command, None)
    if rootfs is not None and command is None:
        raise sec.error("command", "is required with container.rootfs")
    return ContainerSpec(
        name=name, rootfs=rootfs, bundle=bundle, command=command,
        env=sec.get("env", _env, ()), cwd=sec.get("cwd", _abs_path, None),
        user=sec.get("user", _user, None), hostname=sec.get("hostname", _hostname, None),
        mounts=sec.get("mounts", _mounts, ()),
        resources=_resources(file, doc.get("resources", {})),
        restart=_restart(file, doc.get("restart", {})),
        stop=_stop(file, doc.get("stop", {})),
        logs=_logs(file, doc.get("logs", {})),
        network=_network(file, doc.get("network", {})),
        source=file,
    )


# --- files --------------------------------------------------------------------------------


def validate_name(name: str, file: str) -> str:
    """Check a container name (a file's stem) before it becomes an id and a path part.

    Docker's rule: a letter or digit, then letters, digits, ``_``, ``.`` and ``-``; at most
    128 characters. Stricter than the runtime's ids (no ``+ : @``), so that the name is also
    safe in log file names and a default hostname.

    Raises:
        ConfigError: naming the file.
    """
    if not _NAME.fullmatch(name) or len(name) > _NAME_MAX:
        raise ConfigError(file, "", f"{name!r} is not a valid container name: the file name "
                          "must start with a letter or digit and hold only letters, digits, "
                          f"'_', '.' and '-' (at most {_NAME_MAX})")
    return name


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text ({e.reason} at byte {e.start})"
                          ) from None
    except tomllib.TOMLDecodeError as e:
        text = str(e)
        m = _TOML_POSITION.search(text)
        line = int(m.group(1)) if m else None
        where = f" at line {m.group(1)}, column {m.group(2)}" if m else ""
        problem = text[: m.start()] if m else text
        raise ConfigError(path, "", f"invalid TOML{where}: {problem}", line=line) from None


def load_container(path: str | os.PathLike[str]) -> ContainerSpec:
    """Read and check one container file; its name is the file's stem.

    Args:
        path: the ``NAME.toml`` file.

    Returns:
        The checked spec, with every absent section at its defaults.

    Raises:
        ConfigError: naming the file and the key, for a bad name, unreadable or invalid TOML
            (with its line), an unknown section or key, a wrong type or an impossible value.

    Example:
        >>> spec = load_container("/etc/corral/containers.d/web.toml")  # doctest: +SKIP
        >>> spec.name, spec.restart.backoff_max  # doctest: +SKIP
        ('web', 60.0)
    """
    file = os.fspath(path)
    name = validate_name(Path(file).stem, file)
    return _container(file, name, _read_toml(file))


def load_dir(directory: str | os.PathLike[str]
             ) -> tuple[dict[str, ContainerSpec], list[ConfigError]]:
    """Every ``*.toml`` file in `directory`: the good specs by name, and the bad files' errors.

    A bad file is reported and skipped; the others load. Other files (``README``,
    ``web.toml.swp``) are ignored.

    Args:
        directory: the container config directory.

    Returns:
        ``(specs, errors)``: specs by name, errors in file-name order.

    Raises:
        ConfigError: when the directory itself cannot be listed. This is not a list entry on
            purpose: a reload that read "no files" would stop every container.
    """
    top = os.fspath(directory)
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as e:
        raise ConfigError(top, "", f"cannot list the config directory: {e.strerror or e}"
                          ) from None
    specs: dict[str, ContainerSpec] = {}
    errors: list[ConfigError] = []
    for entry in entries:
        if not entry.name.endswith(".toml"):
            continue
        try:
            if not entry.is_file():
                raise ConfigError(entry.path, "", "not a regular file")
            spec = load_container(entry.path)
        except ConfigError as e:
            errors.append(e)
        else:
            specs[spec.name] = spec
    return specs, errors


_DAEMON_KEYS = dict.fromkeys(attrs.fields_dict(DaemonSpec))
_DAEMON_PATHS = ("config_dir", "root", "log_dir", "socket")


def _socket_path(value: object, file: str, key: str) -> str:
    path = _abs_path(value, file, key)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(file, key, f"{path!r} is longer than {_SUN_PATH_MAX} bytes, the "
                          "limit of a unix socket address")
    return path


def _group(value: object, file: str, key: str) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _int(0, _MAX_ID)(value, file, key)
    text = _str(value, file, key)
    if not text or ":" in text or "/" in text or text.strip() != text:
        raise ConfigError(file, key, f"{text!r} is not a group name or gid")
    try:  # the control socket is given this group: a typo must not start an open daemon
        grp.getgrnam(text)
    except KeyError:
        raise ConfigError(file, key, f"no group is named {text!r}") from None
    return text


_BRIDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,14}")


def _bridge_name(value: object, file: str, key: str) -> str:
    text = _str(value, file, key)
    if not _BRIDGE_NAME.fullmatch(text):
        raise ConfigError(file, key, f"{text!r} is not an interface name (1 to 15 letters, "
                          "digits, '_' and '-', starting with a letter or digit)")
    return text


def _ip_subnet(value: object, file: str, key: str, six: bool) -> str:
    """An IPv4 subnet of /8 to /30, or with `six` an IPv6 one of /48 to /120, normalised."""
    text = _str(value, file, key)
    cls, example, lo, hi = ((ipaddress.IPv6Network, "fd77::/64", 48, 120) if six
                            else (ipaddress.IPv4Network, "10.77.0.0/16", 8, 30))
    try:
        net = cls(text)
    except ValueError as e:
        raise ConfigError(file, key, f"{text!r} is not an IPv{6 if six else 4} subnet like "
                          f"\"{example}\" ({e})") from None
    if "/" not in text or not lo <= net.prefixlen <= hi:
        raise ConfigError(file, key, f"{text!r} must give a prefix length from /{lo} to /{hi}")
    return str(net)


def _subnet(value: object, file: str, key: str) -> str:
    return _ip_subnet(value, file, key, six=False)


def _subnet6(value: object, file: str, key: str) -> str:
    return _ip_subnet(value, file, key, six=True)


def _bridge_settings(value: object, file: str, key: str) -> BridgeSettings:
    sec = _Section(file, key + ".", value, dict.fromkeys(attrs.fields_dict(BridgeSettings)))
    d = BridgeSettings()
    return BridgeSettings(bridge=sec.get("bridge", _bridge_name, d.bridge),
                          subnet=sec.get("subnet", _subnet, d.subnet),
                          subnet6=sec.get("subnet6", _subnet6, d.subnet6))


def load_daemon(path: str | os.PathLike[str] | None,
                overrides: Mapping[str, object] | None = None, *,
                required: bool = True) -> DaemonSpec:
    """corrald's own settings: corrald.toml, then the command-line flags over it.

    The file holds top-level keys (``config_dir``, ``root``, ``log_dir``, ``socket``,
    ``socket_group``, ``live_restore``) and a ``[network]`` table (``bridge``, ``subnet``,
    ``subnet6``), checked like a container file: paths absolute,
    the socket path short enough for a unix address. ``socket`` defaults to
    ``ROOT/corrald.sock``, so ``--root`` alone moves everything the daemon writes.

    Args:
        path: the file, or None for none.
        overrides: flags by key (``{"root": "/tmp/r"}``); None values are skipped, so an
            argparse namespace's ``vars()`` can be passed as is. Relative paths are taken
            from the current directory, as a shell user expects.
        required: when False, a missing file means the defaults (the default path need not
            exist); when True, it is an error (an explicit ``--config``).

    Returns:
        The settings.

    Raises:
        ConfigError: naming the file (or ``"command line"``) and the key.
    """
    doc: dict[str, Any] = {}
    file = os.fspath(path) if path is not None else "command line"
    if path is not None and (required or os.path.lexists(file)):
        doc = _read_toml(file)
    values = _checked_daemon_values(file, doc)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in flags.items():
        if key in _DAEMON_PATHS and isinstance(value, str | os.PathLike):
            flags[key] = os.path.abspath(os.fspath(value))
    values.update(_checked_daemon_values("command line", flags))
    if "socket" not in values:
        values["socket"] = _socket_path(
            os.path.join(values.get("root", DEFAULT_ROOT), SOCKET_NAME), file, "socket")
    return DaemonSpec(**values)


def _checked_daemon_values(file: str, table: Mapping[str, object]) -> dict[str, Any]:
    sec = _Section(file, "", dict(table), _DAEMON_KEYS)
    checks: dict[str, Callable[[object, str, str], Any]] = {
        "config_dir": _abs_path, "root": _abs_path, "log_dir": _abs_path,
        "socket": _socket_path, "socket_group": _group, "live_restore": _bool,
        "network": _bridge_settings,
    }
    return {key: sec.get(key, check, None) for key, check in checks.items() if sec.has(key)}


# --- to the runtime -----------------------------------------------------------------------


def to_oci(spec: ContainerSpec, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OCI config.json for `spec`.

    For a rootfs container the base is the runtime's default (`corral spec`'s config, with a
    read-only root and new pid, net, ipc, uts and mount namespaces); for a bundle it is the
    bundle's own config.json, which the caller reads (``_spec.load_bundle``), and only what
    the file sets is laid over it.

    What the spec sets: ``process.terminal`` false (corrald keeps the logs); ``args`` from
    command; ``env`` as ``KEY=VALUE``, over the base's (a rootfs gets only ``PATH`` by
    default); ``cwd``; ``user``; ``hostname`` (a rootfs container's defaults to its name);
    bind mounts appended (``rbind``, plus ``ro`` when readonly); ``linux.resources``
    memory limit, pids limit and a CPU quota of cpus x 100000 µs per 100000 µs; network
    mode ``"host"`` drops the network namespace (``"bridge"`` is added by the daemon, which
    sets the namespace up first: `_network.oci_changes`).

    Args:
        spec: a checked spec.
        base: the config to start from; not modified. Required for a bundle spec.

    Returns:
        A new config dict that ``corral.runtime._spec.validate`` accepts.

    Raises:
        ValueError: for a bundle spec without `base`.
    """
    from corral.runtime._spec import DEFAULT_PATH, default_spec

    if base is None:
        if spec.rootfs is None:
            raise ValueError(f"{spec.name}: a bundle container needs its config.json as base")
        base = default_spec()
    cfg = copy.deepcopy(base)
    proc = cfg.setdefault("process", {})
    proc["terminal"] = False
    if spec.rootfs is not None:
        cfg.setdefault("root", {})["path"] = spec.rootfs
        proc["env"] = [f"PATH={DEFAULT_PATH}"]
        cfg["hostname"] = spec.hostname or spec.name[:_HOST_NAME_MAX]
    elif spec.hostname is not None:
        cfg["hostname"] = spec.hostname
    if spec.command is not None:
        proc["args"] = list(spec.command)
    if spec.env:
        env = {k: v for k, _, v in (e.partition("=") for e in proc.get("env", []))}
        env.update(spec.env)
        proc["env"] = [f"{k}={v}" for k, v in env.items()]
    if spec.cwd is not None:
        proc["cwd"] = spec.cwd
    if spec.user is not None:
        user = proc.setdefault("user", {})
        user["uid"], user["gid"] = spec.user.uid, spec.user.gid
    mounts = cfg.setdefault("mounts", [])
    for m in spec.mounts:
        mounts.append({"destination": m.destination, "type": "bind", "source": m.source,
                       "options": ["rbind", "ro"] if m.readonly else ["rbind"]})
    if spec.network.mode == "host":
        # The host's network: no network namespace of its own (set up later for "bridge").
        lx = cfg.setdefault("linux", {})
        lx["namespaces"] = [ns for ns in lx.get("namespaces", []) if ns.get("type") != "network"]
    res = spec.resources
    if res != ResourceSpec():
        resources = cfg.setdefault("linux", {}).setdefault("resources", {})
        if res.memory is not None:
            resources.setdefault("memory", {})["limit"] = res.memory
        if res.pids is not None:
            resources.setdefault("pids", {})["limit"] = res.pids
        if res.cpus is not None:
            resources.setdefault("cpu", {}).update(
                quota=round(res.cpus * CPU_PERIOD), period=CPU_PERIOD)
    return cfg


def plan_reload(old: Mapping[str, ContainerSpec], new: Mapping[str, ContainerSpec]
                ) -> ReloadPlan:
    """What a reload must do to go from the running specs `old` to the files' specs `new`.

    A changed spec is any difference at all (``!=``), restart policy included: restarting
    is the one way to apply a new spec that corrald can promise is complete.

    Example:
        >>> a, b = ContainerSpec("a", rootfs="/r", command=("x",)), ContainerSpec("b", "/r")
        >>> plan_reload({"a": a, "b": b}, {"a": a, "c": b}).describe()
        'start c; stop b; keep a'
    """
    return ReloadPlan(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        changed=tuple(sorted(n for n in old.keys() & new.keys() if old[n] != new[n])),
        unchanged=tuple(sorted(n for n in old.keys() & new.keys() if old[n] == new[n])),
    )
