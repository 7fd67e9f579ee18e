"""OCI hooks: run each with the state JSON on stdin, its env and args, and its timeout.

A failing prestart/createRuntime/createContainer/startContainer hook fails the operation
(raises); a failing poststart/poststop hook is a warning (the caller logs it), as the
runtime-spec asks. `subprocess` is imported only when a hook exists: most containers have none
and the import costs a few ms.
"""

from __future__ import annotations

from . import _jsonfast as json
from ._errors import CorralError

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any


def run_hooks(config: dict[str, Any], name: str, state: dict[str, Any]) -> None:
    """Run the config's `name` hooks in order; stop at and raise on the first failure.

    Raises:
        CorralError: naming the hook list, the index and the path of the failing hook.
    """
    hooks = (config.get("hooks") or {}).get(name) or []
    if not hooks:
        return
    import subprocess

    payload = json.dumps(state).encode()
    for i, h in enumerate(hooks):
        args = h.get("args") or [h["path"]]
        where = f"hooks.{name}[{i}] ({h['path']})"
        try:
            proc = subprocess.Popen(
                args, executable=h["path"], env=dict(e.split("=", 1) for e in h.get("env", [])),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as e:
            raise CorralError(f"{where}: cannot run: {e.strerror}") from None
        try:
            # communicate() ignores EPIPE from a hook that does not read its stdin.
            out, err = proc.communicate(payload, timeout=h.get("timeout"))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise CorralError(f"{where}: timed out after {h.get('timeout')}s") from None
        if proc.returncode != 0:
            detail = (err or out).decode(errors="replace").strip()
            raise CorralError(f"{where}: exited with status {proc.returncode}"
                              + (f": {detail}" if detail else ""))
