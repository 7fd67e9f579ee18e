"""JSON for the runtime CLI without the `json` package's import cost.

Why: `import json` pulls in `re` and `enum` (~7 ms, a third of a `corral state` call). The
C accelerator `_json` that `json` itself uses needs neither; this module drives it directly
for decoding and writes the small, plain documents corral emits (dicts, lists, str, int,
float, bool, None) itself. Error messages for invalid input come from the real `json`
module, imported only on that path.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # typing costs ~4 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any


class _Context:
    """The attributes `_json.make_scanner` reads from a `json.JSONDecoder`."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict[str, str] = {}  # noqa: RUF012 - read by the C scanner, never mutated here


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed decoder
_WS = " \t\n\r"


def loads(text: str | bytes) -> Any:
    """Parse one JSON document; ValueError (json.JSONDecodeError) with line and column."""
    s = text.decode("utf-8-sig") if isinstance(text, bytes) else text
    i = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, i)
    except Exception:
        # StopIteration, or the scanner's own error path (which needs json.decoder and can
        # fail with SystemError without it): let the json module explain.
        obj, end = None, -1
    if end < 0 or s[end:].strip(_WS):
        import json

        return json.loads(s)  # raises the usual, precise JSONDecodeError
    return obj


def _unserialisable(o: object) -> Any:
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# The C encoder `json.dumps` itself uses when there is no indent: the documents a create
# sends to its init and writes as state.json are one line each, and a forked creator runs
# every Python function it calls for the first time (a copy-on-write fault per page touched).
_c_encode = _json.make_encoder(None, _unserialisable, _json.encode_basestring_ascii, None,
                               ": ", ", ", False, False, False)


def dumps(obj: Any, indent: int | str | None = None) -> str:
    """Serialise like json.dumps(obj, indent=indent) for plain data."""
    if indent is None:
        return "".join(_c_encode(obj, 0))
    pad = " " * indent if isinstance(indent, int) else indent
    out: list[str] = []
    _write(obj, pad, "", out)
    return "".join(out)


def _write(o: Any, pad: str | None, cur: str, out: list[str]) -> None:
    if isinstance(o, str):
        out.append(_json.encode_basestring_ascii(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        if o != o or o in (float("inf"), float("-inf")):
            raise ValueError(f"{o!r} is not JSON")
        out.append(float.__repr__(o))
    elif isinstance(o, dict):
        if not o:
            out.append("{}")
            return
        inner = None if pad is None else cur + pad
        out.append("{" if inner is None else "{\n" + inner)
        first = True
        for k, v in o.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON keys must be strings, not {type(k).__name__}")
            if not first:
                out.append(", " if inner is None else ",\n" + inner)
            first = False
            out.append(_json.encode_basestring_ascii(k))
            out.append(": ")
            _write(v, pad, inner or "", out)
        out.append("}" if inner is None else "\n" + cur + "}")
    elif isinstance(o, (list, tuple)):
        if not o:
            out.append("[]")
            return
        inner = None if pad is None else cur + pad
        out.append("[" if inner is None else "[\n" + inner)
        for n, v in enumerate(o):
            if n:
                out.append(", " if inner is None else ",\n" + inner)
            _write(v, pad, inner or "", out)
        out.append("]" if inner is None else "\n" + cur + "]")
    else:
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
