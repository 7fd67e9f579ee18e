"""``corralctl``: corrald's command-line client, in the habits of systemctl.

Usage::

    corralctl [--socket PATH] [--json] list
    corralctl status NAME
    corralctl start|stop|restart|pause|resume NAME...
    corralctl kill [-s SIGNAL] NAME...
    corralctl logs [-f] [-n N] NAME
    corralctl events [-f] [--since SEQ]
    corralctl reload [--dry-run]

It speaks HTTP/1.1 to corrald's control socket (``--socket``, else ``$CORRALD_SOCKET``, else
/run/corral/corrald.sock) with the standard library only: it needs neither trio nor the
runtime, starts fast, and runs as a plain file (``python3 _ctl.py``) where the package is
not installed. Tables are for people; ``--json`` prints what the daemon sent, for scripts.

Exit status, as systemctl's:
    0  done (``status``: the container is running or paused)
    1  failed: the daemon refused or could not do it, access denied, or corrald is not
       running (the message names the socket)
    2  bad command line
    3  ``status``: the container is not running (stopped, exited, fatal, in backoff...)
    4  no such container
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import urllib.parse
from typing import Any, NoReturn

__all__ = ["DEFAULT_SOCKET", "Client", "DaemonError", "main"]

DEFAULT_SOCKET = "/run/corral/corrald.sock"
TIMEOUT = 300.0  # a stop waits for the container's stop timeout, and SIGKILL after it
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_NO_SUCH = 1, 2, 3, 4
UP_STATES = ("running", "paused")


class DaemonError(Exception):
    """A request failed; `status` is the exit status corralctl ends with."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """One request per call to corrald's API at `path`."""

    def __init__(self, path: str, timeout: float | None = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def _open(self, method: str, url: str, body: dict[str, Any] | None,
              timeout: float | None) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.path, timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
        except FileNotFoundError:
            raise DaemonError(f"corrald is not running: no socket at {self.path}") from None
        except ConnectionRefusedError:
            raise DaemonError(f"corrald is not running: nothing listens on {self.path}"
                              ) from None
        except PermissionError:
            raise DaemonError(f"permission denied on {self.path}: only root and the members "
                              "of corrald's socket_group may use it") from None
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(f"talking to corrald at {self.path}: {e}") from None
        if resp.status >= 400:
            raise _error(resp)
        return resp

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """The decoded JSON (or the text, for a non-JSON answer) of one request."""
        resp = self._open(method, url, body, self.timeout)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(f"reading corrald's answer: {e}") from None
        if resp.getheader("content-type", "").startswith("application/json"):
            return json.loads(data)
        return data

    def stream(self, url: str) -> http.client.HTTPResponse:
        """A response to read as it comes (logs -f, events -f)."""
        return self._open("GET", url, None, None)


def _error(resp: http.client.HTTPResponse) -> DaemonError:
    try:
        body = json.loads(resp.read())
        message, kind = str(body["error"]), str(body.get("kind", ""))
    except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
        message, kind = f"corrald answered {resp.status} {resp.reason}", ""
    status = EXIT_NO_SUCH if kind == "no_such_container" else EXIT_FAILED
    return DaemonError(message, status)


# --- formatting ---------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                     ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}{rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s}s"  # pragma: no cover


def _size(n: int | None) -> str:
    if not n:
        return "0B"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # pragma: no cover


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join(lines)


def _last_exit(entry: dict[str, Any]) -> str:
    ex = entry.get("last_exit")
    return str(ex["description"]) if ex else "-"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _dot() -> str:
    enc = (getattr(sys.stdout, "encoding", None) or "").lower()
    return "\u25cf" if enc.startswith("utf") else "*"


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# --- commands -----------------------------------------------------------------------------


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    entries = client.call("GET", "/v1/containers")
    if args.json:
        _print_json(entries)
        return 0
    rows = [[e["name"], e["state"], str(e["pid"] or "-"), str(e["restarts"]),
             _duration(e["uptime"]), _last_exit(e)] for e in entries]
    print(_table(rows, ["NAME", "STATE", "PID", "RESTARTS", "UPTIME", "LAST EXIT"]))
    return 0


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    info = client.call("GET", f"/v1/containers/{_q(args.name)}")
    up = EXIT_NOT_RUNNING if info["state"] not in UP_STATES else 0
    if args.json:
        _print_json(info)
        return up
    state = info["state"]
    since = ""
    if info["pid"]:
        since = f" (pid {info['pid']}) since {info['started']}; {_duration(info['uptime'])}"
    lines = [f"{_dot()} {info['name']} - {state}",
             f"     State: {state}{since}"]
    if info.get("reason"):
        lines.append(f"    Reason: {info['reason']}")
    lines.append(f"  Restarts: {info['restarts']}" + (
        f" ({info['restarts_in_a_row']} in a row)" if info.get("restarts_in_a_row") else ""))
    lines.append(f" Last exit: {_last_exit(info)}")
    if info.get("oom_kills"):
        lines.append(f" OOM kills: {info['oom_kills']}")
    stats = info.get("stats")
    if stats:
        mem, cpu, pids = stats["memory"], stats["cpu"], stats["pids"]
        extra = [f"max {_size(mem['max'])}"] if mem.get("max") else []
        if mem.get("limit") and mem["limit"] < 2**62:
            extra.append(f"limit {_size(mem['limit'])}")
        lines.append(f"    Memory: {_size(mem['usage'])}"
                     + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"       CPU: {cpu['usage_ns'] / 1e9:.3f}s")
        lines.append(f"     Tasks: {pids['current']}"
                     + (f" (limit {pids['limit']})" if pids.get("limit") else ""))
    if info.get("source"):
        lines.append(f"    Config: {info['source']}")
    lines.append(f"       Log: {info['log']}")
    print("\n".join(lines))
    try:
        tail = client.call("GET", f"/v1/containers/{_q(args.name)}/logs?tail=10")
    except DaemonError:
        tail = b""
    if tail:
        sys.stdout.write("\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(tail)
    return up


def cmd_action(client: Client, args: argparse.Namespace) -> int:
    status = 0
    results = []
    for name in args.names:
        body = {"signal": args.signal} if args.command == "kill" else None
        try:
            results.append(client.call("POST", f"/v1/containers/{_q(name)}/{args.command}",
                                       body))
        except DaemonError as e:
            print(f"corralctl: {args.command} {name}: {e}", file=sys.stderr)
            status = max(status, e.status)  # 4 (no such container) over 1
            continue
        if args.command in ("start", "restart") and results[-1]["state"] == "fatal":
            print(f"corralctl: {args.command} {name}: {results[-1]['reason']}",
                  file=sys.stderr)
            status = status or EXIT_FAILED
    if args.json:
        _print_json(results)
    return status


def _copy(resp: http.client.HTTPResponse, out: Any, line: Any = None) -> None:
    pending = b""
    while True:
        try:
            chunk = resp.read1(65536)
        except http.client.IncompleteRead:  # the connection closed mid-stream
            raise DaemonError("corrald closed the stream (it is stopping?)") from None
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(f"the stream from corrald ended: {e}") from None
        if not chunk:
            break
        if line is None:
            out.write(chunk)
            out.flush()
            continue
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line(raw)


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    url = f"/v1/containers/{_q(args.name)}/logs?tail={args.lines}"
    if not args.follow:
        data = client.call("GET", url)
        sys.stdout.buffer.write(data)
        return 0
    _copy(client.stream(url + "&follow=1"), sys.stdout.buffer)
    return 0


def _event_line(raw: bytes, as_json: bool) -> None:
    if not raw.strip():
        return
    if as_json:
        sys.stdout.write(raw.decode(errors="replace") + "\n")
        sys.stdout.flush()
        return
    ev = json.loads(raw)
    kind = ev.get("type")
    if kind == "gap":
        text = (f"-- {ev['missed']} event(s) after {ev['since']} are gone from the ring; "
                f"the oldest kept is {ev['oldest']} --")
        if ev.get("reset"):
            text = (f"-- event {ev['since']} is from an earlier corrald (numbers start again "
                    "with each daemon): every event kept follows --")
        print(text, flush=True)
        return
    detail = {
        "state": lambda: f"{ev.get('from')} -> {ev.get('to')}"
                         + (f" ({ev['detail']})" if ev.get("detail") else ""),
        "exit": lambda: str(ev.get("description")),
        "oom": lambda: f"OOM kill of {ev.get('count')} process(es), level {ev.get('level')}",
        "action": lambda: f"{ev.get('action')}"
                          + (f" signal {ev['signal']}" if ev.get("signal") else "")
                          + f" by uid {ev.get('uid')} (pid {ev.get('pid')})",
        "reload": lambda: "; ".join(f"{k} {', '.join(ev[k])}" for k in
                                    ("added", "removed", "changed") if ev.get(k)) or "no change",
    }.get(str(kind), lambda: json.dumps({k: v for k, v in ev.items()
                                         if k not in ("seq", "time", "type", "container")}))()
    print(f"{ev['seq']:>6} {ev['time']} {ev.get('container', '-')} {kind}: {detail}",
          flush=True)


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    query = []
    if args.since is not None:
        query.append(f"since={args.since}")
    if args.follow:
        query.append("follow=1")
    url = "/v1/events" + ("?" + "&".join(query) if query else "")
    if args.follow:
        _copy(client.stream(url), sys.stdout, lambda raw: _event_line(raw, args.json))
        return 0
    data = client.call("GET", url)
    for raw in data.split(b"\n"):
        _event_line(raw, args.json)
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    plan = client.call("POST", "/v1/reload", {"dry_run": args.dry_run})
    if args.json:
        _print_json(plan)
    else:
        verb = "would " if plan["dry_run"] else ""
        down = set(plan["stay_stopped"])
        parts = [(f"{verb}start", [n for n in plan["added"] if n not in down]),
                 (f"{verb}stop", plan["removed"]),
                 (f"{verb}restart", [n for n in plan["changed"] if n not in down]),
                 ("unchanged", plan["unchanged"]),
                 (f"{verb}take the new config and stay stopped (stopped by the user)",
                  plan["stay_stopped"])]
        for label, names in parts:
            if names:
                print(f"{label}: {', '.join(names)}")
        if not any(names for _, names in parts):
            print("no containers configured")
    for err in plan["errors"]:
        print(f"corralctl: {err}", file=sys.stderr)
    return EXIT_FAILED if plan["errors"] else 0


# --- the command line ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="corrald's control socket (default $CORRALD_SOCKET or "
                             f"{DEFAULT_SOCKET})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of tables")
    p = argparse.ArgumentParser(prog="corralctl", parents=[common],
                                description="Control corrald, corral's supervisor daemon.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", parents=[common], help="every container: state, pid, restarts")
    s = sub.add_parser("status", parents=[common], help="one container in detail")
    s.add_argument("name")
    for verb, text in (("start", "start stopped containers"), ("stop", "stop containers"),
                       ("restart", "stop, then start"), ("pause", "freeze containers"),
                       ("resume", "thaw paused containers"),
                       ("kill", "send a signal to the containers' init")):
        s = sub.add_parser(verb, parents=[common], help=text)
        if verb == "kill":
            s.add_argument("-s", "--signal", default="TERM",
                           help="a name or number (default TERM)")
        s.add_argument("names", nargs="+", metavar="NAME")
    s = sub.add_parser("logs", parents=[common], help="a container's log")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("-n", "--lines", type=_count, default=10,
                   help="the last N lines first (default 10)")
    s.add_argument("name")
    s = sub.add_parser("events", parents=[common], help="state changes, exits, OOM kills")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    s.add_argument("--since", type=_count, help="only events after this sequence number")
    s = sub.add_parser("reload", parents=[common], help="re-read the container files")
    s.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    return p


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return int(text)


COMMANDS = {"list": cmd_list, "status": cmd_status, "logs": cmd_logs, "events": cmd_events,
            "reload": cmd_reload, **dict.fromkeys(
                ("start", "stop", "restart", "kill", "pause", "resume"), cmd_action)}


def _fail(message: str, status: int) -> NoReturn:
    print(f"corralctl: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    """Run one corralctl command; returns the exit status."""
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    path = getattr(args, "socket", None) or os.environ.get("CORRALD_SOCKET") or DEFAULT_SOCKET
    client = Client(path)
    try:
        return COMMANDS[args.command](client, args)
    except DaemonError as e:
        _fail(str(e), e.status)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `corralctl logs -f | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
