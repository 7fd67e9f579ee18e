"""corral.supervisor: corrald, the trio supervisor daemon, and the pieces it is built from.

The code lives in private modules; this module only re-exports what the daemon and its tests
use, as trio does.
"""

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
