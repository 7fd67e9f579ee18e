"""The ``corrald`` command: parse the flags, load the settings, run the daemon in the foreground.

Usage::

    corrald [--config FILE] [--config-dir DIR] [--root DIR] [--log-dir DIR] [--socket PATH]

Logs go to stderr (journald takes them under systemd). Exit status: 0 after a stop by
SIGTERM/SIGINT, 2 for a bad command line or corrald.toml, 1 when the daemon failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from ._config import DEFAULT_DAEMON_CONFIG, ConfigError, load_daemon
from ._daemon import AlreadyRunning, run_daemon

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corrald", description="corral's supervisor daemon")
    p.add_argument("--config", help=f"the daemon's settings (default {DEFAULT_DAEMON_CONFIG}, "
                                    "optional there)")
    p.add_argument("--config-dir", dest="config_dir", help="the container files (*.toml)")
    p.add_argument("--root", help="the runtime's state root")
    p.add_argument("--log-dir", dest="log_dir", help="where container logs go")
    p.add_argument("--socket", help="corrald's control socket (default ROOT/corrald.sock); "
                                    "its lock and the namespace helper's socket go beside it")
    p.add_argument("--debug", action="store_true", help="log debug messages too")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run corrald; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
        format="corrald: %(levelname)s: %(message)s")
    flags = {k: getattr(args, k) for k in ("config_dir", "root", "log_dir", "socket")}
    try:
        spec = load_daemon(args.config or DEFAULT_DAEMON_CONFIG, flags,
                           required=args.config is not None)
    except ConfigError as e:
        logging.getLogger("corrald").error("%s", e)
        return 2
    try:
        return trio.run(run_daemon, spec)
    except AlreadyRunning as e:
        logging.getLogger("corrald").error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:
        logging.getLogger("corrald").exception("corrald failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
