"""`corral`: runc's command line over the runtime library.

The CLI only parses and dispatches; each command is a few lines calling one library
operation. The parser is hand-written rather than argparse because argparse (with `re` and
gettext) costs ~9 ms of a ~20 ms `corral state`, and runc's urfave/cli grammar is small:
global flags, a command, its flags (`--flag value`, `--flag=value`, `-f`, single-dash long
names), then positionals; `exec` stops at its first positional so the container's own
arguments pass through untouched.
"""

from __future__ import annotations

import os
import sys

from . import _jsonfast as json
from ._errors import CorralError
from ._log import Log
from ._state import DEFAULT_ROOT, Root

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

VERSION = "0.1.0"

# flag -> (destination, takes a value)
Flags = dict[str, tuple[str, bool]]

GLOBAL: Flags = {
    "--root": ("root", True), "--log": ("log", True), "--log-format": ("log_format", True),
    "--debug": ("debug", False), "--systemd-cgroup": ("systemd_cgroup", False),
    "--rootless": ("rootless", True), "--criu": ("criu", True),
    "--help": ("help", False), "-h": ("help", False),
    "--version": ("version", False), "-v": ("version", False),
}
_CREATE: Flags = {
    "--bundle": ("bundle", True), "-b": ("bundle", True), "--pid-file": ("pid_file", True),
    "--console-socket": ("console_socket", True), "--no-pivot": ("no_pivot", False),
    "--no-new-keyring": ("no_new_keyring", False), "--preserve-fds": ("preserve_fds", True),
}
COMMANDS: dict[str, tuple[Flags, str]] = {
    "spec": ({"--bundle": ("bundle", True), "-b": ("bundle", True),
              "--rootless": ("rootless", False)}, "create a new specification file"),
    "create": (_CREATE, "create a container"),
    "start": ({}, "executes the user defined process in a created container"),
    "run": ({**_CREATE, "--detach": ("detach", False), "-d": ("detach", False),
             "--keep": ("keep", False), "--no-subreaper": ("no_subreaper", False)},
            "create and run a container"),
    "state": ({}, "output the state of a container"),
    "list": ({"--format": ("format", True), "-f": ("format", True), "--quiet": ("quiet", False),
              "-q": ("quiet", False)}, "lists containers started by corral with the given root"),
    "kill": ({"--all": ("all", False), "-a": ("all", False)},
             "kill sends the specified signal (default: SIGTERM) to the container's init process"),
    "delete": ({"--force": ("force", False), "-f": ("force", False)}, "delete a container"),
    "features": ({}, "show the enabled features"),
    "exec": ({
        "--process": ("process", True), "-p": ("process", True),
        "--console-socket": ("console_socket", True), "--pid-file": ("pid_file", True),
        "--detach": ("detach", False), "-d": ("detach", False), "--tty": ("tty", False),
        "-t": ("tty", False), "--user": ("user", True), "-u": ("user", True),
        "--additional-gids": ("additional_gids+", True), "-g": ("additional_gids+", True),
        "--cwd": ("cwd", True), "--env": ("env+", True), "-e": ("env+", True),
        "--cap": ("cap+", True), "-c": ("cap+", True), "--no-new-privs": ("no_new_privs", False),
        "--preserve-fds": ("preserve_fds", True), "--ignore-paused": ("ignore_paused", False),
        "--process-label": ("process_label", True), "--apparmor": ("apparmor", True),
    }, "execute new process inside the container"),
    "pause": ({}, "pause suspends all processes inside the container"),
    "events": ({"--stats": ("stats", False), "--interval": ("interval", True)},
               "display container events such as OOM notifications and cpu, memory, and IO "
               "usage statistics"),
    "resume": ({}, "resumes all processes that have been previously paused"),
    "ps": ({"--format": ("format", True), "-f": ("format", True)},
           "ps displays the processes running inside a container"),
    "update": ({f: (d, True) for f, d in (
        ("--resources", "resources"), ("-r", "resources"), ("--memory", "memory"),
        ("--memory-swap", "memory_swap"), ("--memory-reservation", "memory_reservation"),
        ("--kernel-memory", "kernel_memory"), ("--kernel-memory-tcp", "kernel_memory_tcp"),
        ("--cpu-shares", "cpu_shares"), ("--cpu-quota", "cpu_quota"),
        ("--cpu-period", "cpu_period"), ("--cpu-rt-period", "cpu_rt_period"),
        ("--cpu-rt-runtime", "cpu_rt_runtime"), ("--cpuset-cpus", "cpuset_cpus"),
        ("--cpuset-mems", "cpuset_mems"), ("--pids-limit", "pids_limit"),
        ("--blkio-weight", "blkio_weight"), ("--l3-cache-schema", "l3_cache_schema"),
        ("--mem-bw-schema", "mem_bw_schema"))},
        "update container resource constraints"),
}
NOT_YET = ("checkpoint", "restore")
USAGE_ARGS = {"create": "<container-id>", "start": "<container-id>", "run": "<container-id>",
              "state": "<container-id>", "kill": "<container-id> [signal]",
              "delete": "<container-id>", "list": "", "spec": "", "features": "",
              "pause": "<container-id>", "resume": "<container-id>",
              "events": "<container-id>",
              "exec": "<container-id> <command> [command options]",
              "ps": "<container-id> [ps options]", "update": "<container-id>"}


class UsageError(CorralError):
    """Bad command-line usage; printed like any other error, exit status 1."""


def _parse(argv: list[str], flags: Flags, where: str, stop_at_positional: bool = False,
           ) -> tuple[dict[str, Any], list[str]]:
    opts: dict[str, Any] = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            pos.extend(argv[i:])
            break
        if not a.startswith("-") or a == "-":
            pos.append(a)
            if stop_at_positional:
                pos.extend(argv[i:])
                break
            continue
        name, eq, value = a.partition("=")
        spec = flags.get(name)
        if spec is None and not name.startswith("--") and len(name) > 2:
            spec = flags.get("-" + name)  # Go's flag package takes -bundle for --bundle
        if spec is None:
            raise UsageError(f"{where}: unknown flag {name!r}")
        dest, takes_value = spec
        if takes_value:
            if not eq:
                if i >= len(argv):
                    raise UsageError(f"{where}: flag {name} needs a value")
                value = argv[i]
                i += 1
            if dest.endswith("+"):  # repeatable: -e A=1 -e B=2
                opts.setdefault(dest[:-1], []).append(value)
            else:
                opts[dest] = value
        else:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"{where}: flag {name} takes true or false, not {value!r}")
            opts[dest] = not eq or value.lower() in ("true", "1")
    return opts, pos


def _help(cmd: str | None) -> str:
    if cmd is None:
        lines = ["usage: corral [global options] command [command options] [arguments...]",
                 "", "commands:"]
        lines += [f"   {c:<12}{COMMANDS[c][1]}" for c in COMMANDS]
        lines += ["", "global options:", "   --root value        root directory for storage of "
                  f"container state (default: {DEFAULT_ROOT})",
                  "   --log value         set the log file to write runtime logs to",
                  "   --log-format value  set the log format ('text' (default), or 'json')",
                  "   --debug             enable debug logging",
                  "   --systemd-cgroup    use the systemd cgroup driver (not supported yet)"]
        return "\n".join(lines) + "\n"
    flags = COMMANDS[cmd][0] if cmd in COMMANDS else {}
    lines = [f"usage: corral {cmd} [command options] {USAGE_ARGS.get(cmd, '')}".rstrip()]
    if flags:
        lines += ["", "options:"] + [f"   {f}{' value' if v else ''}" for f, (_, v) in
                                     flags.items()]
    return "\n".join(lines) + "\n"


def _one_id(pos: list[str], cmd: str, extra: int = 0) -> str:
    if not pos:
        raise UsageError(f"{cmd}: a container id is required")
    if len(pos) > 1 + extra:
        raise UsageError(f"{cmd}: unexpected arguments {pos[1 + extra:]!r}")
    return pos[0]


def _create_options(opts: dict[str, Any], g: dict[str, Any]) -> Any:
    from ._container import CreateOptions

    preserve = opts.get("preserve_fds", "0")
    try:
        n = int(preserve)
    except ValueError:
        raise UsageError(f"--preserve-fds: {preserve!r} is not a number") from None
    return CreateOptions(
        bundle=opts.get("bundle") or ".", pid_file=opts.get("pid_file"),
        console_socket=opts.get("console_socket"), no_pivot=bool(opts.get("no_pivot")),
        no_new_keyring=bool(opts.get("no_new_keyring")), preserve_fds=n,
        systemd_cgroup=bool(g.get("systemd_cgroup")))


def cmd_spec(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
             log: Log) -> int:
    from ._spec import default_spec

    if pos:
        raise UsageError(f"spec: unexpected arguments {pos!r}")
    bundle = opts.get("bundle") or "."
    path = os.path.join(bundle, "config.json")
    if os.path.exists(path):
        raise CorralError(f"File {path} exists. Remove it first")
    with open(path, "x") as f:
        f.write(json.dumps(default_spec(), indent="\t"))
    return 0


def cmd_create(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
               log: Log) -> int:
    from ._container import create_container

    create_container(root, _one_id(pos, "create"), _create_options(opts, g), log)
    return 0


def cmd_run(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
            log: Log) -> int:
    from ._container import run

    return run(root, _one_id(pos, "run"), _create_options(opts, g), bool(opts.get("detach")),
               bool(opts.get("keep")), log)


def cmd_start(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
              log: Log) -> int:
    from ._container import start

    start(root, _one_id(pos, "start"), log)
    return 0


def cmd_state(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
              log: Log) -> int:
    st = root.load(_one_id(pos, "state"))
    sys.stdout.write(json.dumps(st.oci(), indent=2) + "\n")
    return 0


def cmd_list(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
             log: Log) -> int:
    from ._container import list_states

    if pos:
        raise UsageError(f"list: unexpected arguments {pos!r}")
    fmt = opts.get("format", "table")
    if fmt not in ("table", "json"):
        raise UsageError(f"list: invalid format {fmt!r} (table or json)")
    states = list_states(root)
    if opts.get("quiet"):
        sys.stdout.write("".join(s["id"] + "\n" for s in states))
    elif fmt == "json":
        sys.stdout.write(json.dumps(states) + "\n")
    else:
        rows = [["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]]
        rows += [[s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"],
                  s["owner"] or "root"] for s in states]
        widths = [max(12, *(len(r[i]) for r in rows)) + 3 for i in range(5)]
        for r in rows:
            sys.stdout.write("".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                             + r[5] + "\n")
    return 0


def cmd_kill(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
             log: Log) -> int:
    from ._container import kill, parse_signal

    cid = _one_id(pos, "kill", extra=1)
    sig = parse_signal(pos[1] if len(pos) > 1 else "TERM")
    kill(root, cid, sig, bool(opts.get("all")))
    return 0


def cmd_delete(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
               log: Log) -> int:
    from ._container import delete

    delete(root, _one_id(pos, "delete"), bool(opts.get("force")), log)
    return 0


def cmd_features(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
                 log: Log) -> int:
    from ._spec import features

    sys.stdout.write(json.dumps(features(), indent=4) + "\n")
    return 0


def cmd_exec(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
             log: Log) -> int:
    from ._exec import ExecOptions, exec_container

    if not pos:
        raise UsageError("exec: a container id is required")
    for flag in ("process_label", "apparmor"):
        if opts.get(flag):
            raise CorralError(f"exec: --{flag.replace('_', '-')} is not supported (no LSM "
                              "support yet)")
    eo = ExecOptions()
    eo.process_file = opts.get("process")
    eo.console_socket = opts.get("console_socket")
    eo.pid_file = opts.get("pid_file")
    eo.detach = bool(opts.get("detach"))
    eo.tty = bool(opts.get("tty"))
    eo.user = opts.get("user")
    eo.additional_gids = opts.get("additional_gids", [])
    eo.cwd = opts.get("cwd")
    eo.env = opts.get("env", [])
    eo.caps = opts.get("cap", [])
    eo.no_new_privs = bool(opts.get("no_new_privs"))
    eo.ignore_paused = bool(opts.get("ignore_paused"))
    try:
        eo.preserve_fds = int(opts.get("preserve_fds", "0"))
    except ValueError:
        raise UsageError(f"--preserve-fds: {opts['preserve_fds']!r} is not a number") from None
    return exec_container(root, pos[0], pos[1:], eo, log)


def cmd_events(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
               log: Log) -> int:
    from ._events import events, parse_duration, write_stdout

    return events(root, _one_id(pos, "events"), stats_only=bool(opts.get("stats")),
                  interval=parse_duration(opts.get("interval", "5s")), write=write_stdout)


def cmd_pause(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
              log: Log) -> int:
    from ._container import pause

    pause(root, _one_id(pos, "pause"))
    return 0


def cmd_resume(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
               log: Log) -> int:
    from ._container import resume

    resume(root, _one_id(pos, "resume"))
    return 0


def cmd_ps(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
           log: Log) -> int:
    """`ps ID [ps options]`: ps(1)'s lines for the container's processes (default `-ef`)."""
    from ._container import processes

    if not pos:
        raise UsageError("ps: a container id is required")
    fmt = opts.get("format", "table")
    if fmt not in ("table", "json"):
        raise UsageError(f"ps: invalid format {fmt!r} (table or json)")
    pids = processes(root, pos[0])
    if fmt == "json":
        sys.stdout.write(json.dumps(pids) + "\n")
        return 0
    import subprocess

    try:
        out = subprocess.run(["ps", *(pos[1:] or ["-ef"])], capture_output=True, check=True,
                             text=True).stdout
    except FileNotFoundError:
        raise CorralError("ps: the ps command is not installed") from None
    except subprocess.CalledProcessError as e:
        raise CorralError(f"ps {' '.join(pos[1:])}: {e.stderr.strip()}") from None
    lines = out.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    if "PID" not in header:
        raise CorralError("ps: the ps options must produce a PID column")
    col = header.index("PID")
    wanted = {str(p) for p in pids}
    sys.stdout.write(lines[0] + "\n")
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > col and fields[col] in wanted:
            sys.stdout.write(line + "\n")
    return 0


_UPDATE_FLAGS: dict[str, tuple[str, str, str]] = {
    # option -> (--flag, resources object, key); sizes accept unit suffixes
    "memory": ("--memory", "memory", "limit"),
    "memory_swap": ("--memory-swap", "memory", "swap"),
    "memory_reservation": ("--memory-reservation", "memory", "reservation"),
    "kernel_memory": ("--kernel-memory", "memory", "kernel"),
    "kernel_memory_tcp": ("--kernel-memory-tcp", "memory", "kernelTCP"),
    "cpu_shares": ("--cpu-shares", "cpu", "shares"),
    "cpu_quota": ("--cpu-quota", "cpu", "quota"),
    "cpu_period": ("--cpu-period", "cpu", "period"),
    "cpu_rt_period": ("--cpu-rt-period", "cpu", "realtimePeriod"),
    "cpu_rt_runtime": ("--cpu-rt-runtime", "cpu", "realtimeRuntime"),
    "cpuset_cpus": ("--cpuset-cpus", "cpu", "cpus"),
    "cpuset_mems": ("--cpuset-mems", "cpu", "mems"),
    "pids_limit": ("--pids-limit", "pids", "limit"),
    "blkio_weight": ("--blkio-weight", "blockIO", "weight"),
}
_SIZES = {"memory", "memory_swap", "memory_reservation", "kernel_memory", "kernel_memory_tcp"}


def cmd_update(root: Root, opts: dict[str, Any], pos: list[str], g: dict[str, Any],
               log: Log) -> int:
    """`update`: --resources FILE|- (OCI LinuxResources JSON) and runc's single-value flags."""
    from ._container import update
    from ._resources import parse_size

    cid = _one_id(pos, "update")
    patch: dict[str, Any] = {}
    src = opts.get("resources")
    if src is not None:
        try:
            raw = sys.stdin.read() if src == "-" else open(src).read()  # noqa: SIM115
        except OSError as e:
            raise CorralError(f"--resources {src}: {e.strerror}") from None
        try:
            patch = json.loads(raw)
        except ValueError as e:
            raise CorralError(f"--resources {src}: invalid JSON: {e}") from None
        if not isinstance(patch, dict):
            raise CorralError(f"--resources {src}: must hold a JSON object (LinuxResources)")
    for opt, (flag, obj, key) in _UPDATE_FLAGS.items():
        if opt not in opts:
            continue
        text = opts[opt]
        value: Any
        if opt in _SIZES:
            value = parse_size(text, flag)
        elif opt in ("cpuset_cpus", "cpuset_mems"):
            value = text
        else:
            try:
                value = int(text)
            except ValueError:
                raise CorralError(f"{flag}: {text!r} is not an integer") from None
        patch.setdefault(obj, {})[key] = value
    if not patch:
        raise UsageError("update: nothing to update (give --resources or a resource flag)")
    update(root, cid, patch)
    return 0


HANDLERS: dict[str, Callable[[Root, dict[str, Any], list[str], dict[str, Any], Log], int]] = {
    "spec": cmd_spec, "create": cmd_create, "run": cmd_run, "start": cmd_start,
    "state": cmd_state, "list": cmd_list, "kill": cmd_kill, "delete": cmd_delete,
    "features": cmd_features, "events": cmd_events, "exec": cmd_exec, "pause": cmd_pause,
    "resume": cmd_resume, "ps": cmd_ps, "update": cmd_update,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `corral` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    log = Log()
    try:
        # Global flags come before the command.
        split = 0
        while split < len(args) and args[split].startswith("-"):
            name = args[split].partition("=")[0]
            spec = GLOBAL.get(name) or GLOBAL.get("-" + name)
            split += 2 if spec and spec[1] and "=" not in args[split] else 1
        g, rest = _parse(args[:split], GLOBAL, "corral")
        rest += args[split:]
        log = Log(g.get("log"), g.get("log_format", "text"), bool(g.get("debug")))
        if g.get("log_format", "text") not in ("text", "json"):
            raise UsageError(f"--log-format: {g['log_format']!r} is not text or json")
        if g.get("version"):
            sys.stdout.write(f"corral version {VERSION}\nspec: 1.0.2-dev\n")
            return 0
        if not rest:
            sys.stdout.write(_help(None))
            return 0 if g.get("help") else 1
        cmd, cargs = rest[0], rest[1:]
        if g.get("help") or cmd == "help":
            sys.stdout.write(_help(cargs[0] if cmd == "help" and cargs else None))
            return 0
        if "--help" in cargs or "-h" in cargs:
            sys.stdout.write(_help(cmd))
            return 0
        if cmd in NOT_YET:
            raise CorralError(f"command {cmd!r} is not implemented yet")
        if cmd not in COMMANDS:
            raise UsageError(f"unknown command {cmd!r}")
        opts, pos = _parse(cargs, COMMANDS[cmd][0], cmd,
                           stop_at_positional=cmd in ("ps", "exec"))
        root = Root(g.get("root") or DEFAULT_ROOT)
        log.debug(f"{cmd} {' '.join(cargs)}")
        return HANDLERS[cmd](root, opts, pos, g, log)
    except CorralError as e:
        log.error(str(e))
        return 1
    except OSError as e:
        log.error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The console script: main(), then exit without tearing the interpreter down.

    Interpreter teardown (module and object finalisation) costs a few ms that a runtime
    called thousands of times by an engine does not need; stdio is flushed first.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    entry()
