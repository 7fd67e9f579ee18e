"""corral.supervisor: corrald, the trio supervisor daemon, and the pieces it is built from.

The code lives in private modules; this module only re-exports what the daemon and its tests
use, as trio does, but lazily (PEP 562): the namespace helper runs as
``python -m corral.supervisor._nshelper``, which imports this package first, and the helper
must not carry the config parser (attrs, tomllib, ipaddress: ~3.5 MB of heap) that it never
uses. Every page of the helper's heap is copied into each creator it forks and torn down at
each exit and exec, three times per container started.
"""

from __future__ import annotations

TYPE_CHECKING = False  # mypy honours this name; the runtime never imports typing here
if TYPE_CHECKING:
    from ._config import DEFAULT_CONFIG_DIR as DEFAULT_CONFIG_DIR
    from ._config import DEFAULT_DAEMON_CONFIG as DEFAULT_DAEMON_CONFIG
    from ._config import DEFAULT_LOG_DIR as DEFAULT_LOG_DIR
    from ._config import DEFAULT_ROOT as DEFAULT_ROOT
    from ._config import BridgeSettings as BridgeSettings
    from ._config import ConfigError as ConfigError
    from ._config import ContainerSpec as ContainerSpec
    from ._config import DaemonSpec as DaemonSpec
    from ._config import LogSpec as LogSpec
    from ._config import Mount as Mount
    from ._config import NetworkSpec as NetworkSpec
    from ._config import PortSpec as PortSpec
    from ._config import ReloadPlan as ReloadPlan
    from ._config import ResourceSpec as ResourceSpec
    from ._config import RestartPolicy as RestartPolicy
    from ._config import RestartSpec as RestartSpec
    from ._config import StopSpec as StopSpec
    from ._config import User as User
    from ._config import load_container as load_container
    from ._config import load_daemon as load_daemon
    from ._config import load_dir as load_dir
    from ._config import plan_reload as plan_reload
    from ._config import to_oci as to_oci
    from ._policy import Decision as Decision
    from ._policy import ExitCause as ExitCause
    from ._policy import Fatal as Fatal
    from ._policy import RestartAfter as RestartAfter
    from ._policy import RestartState as RestartState
    from ._policy import StayExited as StayExited
    from ._policy import starts_at_boot as starts_at_boot
    from ._units import parse_duration as parse_duration
    from ._units import parse_size as parse_size

# name -> the private module that defines it
_EXPORTS = {
    "DEFAULT_CONFIG_DIR": "_config",
    "DEFAULT_DAEMON_CONFIG": "_config",
    "DEFAULT_LOG_DIR": "_config",
    "DEFAULT_ROOT": "_config",
    "BridgeSettings": "_config",
    "ConfigError": "_config",
    "ContainerSpec": "_config",
    "DaemonSpec": "_config",
    "LogSpec": "_config",
    "Mount": "_config",
    "NetworkSpec": "_config",
    "PortSpec": "_config",
    "ReloadPlan": "_config",
    "ResourceSpec": "_config",
    "RestartPolicy": "_config",
    "RestartSpec": "_config",
    "StopSpec": "_config",
    "User": "_config",
    "load_container": "_config",
    "load_daemon": "_config",
    "load_dir": "_config",
    "plan_reload": "_config",
    "to_oci": "_config",
    "Decision": "_policy",
    "ExitCause": "_policy",
    "Fatal": "_policy",
    "RestartAfter": "_policy",
    "RestartState": "_policy",
    "StayExited": "_policy",
    "starts_at_boot": "_policy",
    "parse_duration": "_units",
    "parse_size": "_units",
}


def __getattr__(name: str) -> object:
    """Import the module that defines `name` on first use, and keep the value here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
