"""Durations and sizes as written in corrald's TOML files, and the error that names file and key.

`ConfigError` lives here, at the bottom of the supervisor's modules, because the unit parsers
raise it and `_config` builds on them; its public home is `corral.supervisor.ConfigError`.

Both parsers are strict on purpose (anti-pattern 9: forgiving input): a value that could mean
two things is an error that says what to write instead, never a guess.

Durations are strings only. A TOML integer such as ``timeout = 10`` is refused: systemd reads a
bare number as seconds, Docker's API as nanoseconds, supervisord as seconds, so whichever we
picked would surprise someone; ``"10s"`` cannot be misread.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from corral.runtime._errors import CorralError

__all__ = ["ConfigError", "parse_duration", "parse_size", "show_value"]


class ConfigError(CorralError):
    """A bad value in a corrald TOML file: the message names the file and the dotted key.

    The message is ``"FILE: KEY: problem"``, or ``"FILE: problem"`` when the problem is the
    file as a whole (invalid TOML, a bad file name, an unreadable file).

    Args:
        file: the path of the file (or ``"command line"`` for a flag).
        key: the dotted key, like ``"restart.backoff_max"`` or ``"container.mounts[1].source"``;
            ``""`` for the whole file.
        problem: what is wrong, in words the user can act on.
        line: the line number when known (TOML syntax errors).

    Example:
        >>> str(ConfigError("/etc/corral/containers.d/web.toml", "stop.signal", "bad"))
        '/etc/corral/containers.d/web.toml: stop.signal: bad'
    """

    def __init__(self, file: str, key: str, problem: str, line: int | None = None) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        self.line = line
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str, int | None]]:
        return (type(self), (self.file, self.key, self.problem, self.line))


# --- durations ----------------------------------------------------------------------------

# Exact fractions, so that "100ms" is 0.1 and "300ms" is 0.3, not 0.30000000000000004.
_DURATION_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60),
                   "h": Fraction(3600)}
# One or more number+unit pairs: "100ms", "1.5s", "1m30s", "1h 30m". Units longest first so
# that "ms" is not read as "m" followed by a stray "s".
_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h)")


def parse_duration(value: object, file: str, key: str) -> float:
    """Seconds from a duration string: ``"100ms"``, ``"10s"``, ``"1.5s"``, ``"1m"``, ``"1h"``.

    Parts may be combined, as in Go and systemd: ``"1m30s"`` or ``"1h 30m"`` (90 s, 5400 s).
    Units: ``ms``, ``s``, ``m`` (minutes), ``h``. Every part needs a unit, even ``"0s"``.

    Args:
        value: the value read from TOML (anything: the type is checked here).
        file: the file it came from, for the error.
        key: its dotted key, for the error.

    Returns:
        The duration in seconds, a finite float >= 0.

    Raises:
        ConfigError: for a non-string (integers included: see the module docstring), a
            negative value, a missing or unknown unit, or anything else.

    Example:
        >>> parse_duration("1m30s", "f.toml", "stop.timeout")
        90.0
    """
    if not isinstance(value, str):
        raise ConfigError(file, key, f"must be a duration string like \"10s\" or \"100ms\", "
                          f"not {show_value(value)} (a bare number is ambiguous)")
    text = value.strip()
    if text.startswith("-"):
        raise ConfigError(file, key, f"{value!r}: a duration must not be negative")
    pos, total, parts = 0, Fraction(0), 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            break
        total += Fraction(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos, parts = m.end(), parts + 1
    if parts == 0 or pos != len(text):
        raise ConfigError(file, key, f"{value!r} is not a duration (write it like \"100ms\", "
                          "\"10s\", \"1.5s\", \"1m\" or \"1h\")")
    try:
        seconds = float(total)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ConfigError(file, key, f"{value!r} is too long")
    return seconds


# --- sizes --------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"([0-9]+)(\.[0-9]+)? ?(?:([KMGT])I?B?|B)?", re.IGNORECASE)


def parse_size(value: object, file: str, key: str) -> int:
    """Bytes from a size: ``"64M"``, ``"512K"``, ``"1G"``, ``"1.5G"``, ``"100"`` or ``100``.

    Binary multiples (K = 1024), case-insensitive, with an optional ``B``/``iB`` tail as
    Docker's ``RAMInBytes`` takes them (``"64MiB"``, ``"64mb"``). A TOML integer is a byte
    count: unlike a bare duration it cannot be misread. A fraction needs a suffix
    (``"1.5G"``, not ``"1.5"``) and is rounded down to whole bytes.

    Args:
        value: the value read from TOML.
        file: the file it came from, for the error.
        key: its dotted key, for the error.

    Returns:
        The size in bytes, >= 0 (callers refuse 0 where it is impossible).

    Raises:
        ConfigError: for a negative size, an unknown suffix, a float or bool, or anything else.

    Example:
        >>> parse_size("64M", "f.toml", "resources.memory")
        67108864
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(file, key, f"{value}: a size must not be negative")
        return value
    if not isinstance(value, str):
        raise ConfigError(file, key, f"must be a size like \"64M\" or a number of bytes, "
                          f"not {show_value(value)}")
    text = value.strip()
    if text.startswith("-"):
        raise ConfigError(file, key, f"{value!r}: a size must not be negative")
    m = _SIZE.fullmatch(text)
    if m is None or (m.group(2) and not m.group(3)):
        raise ConfigError(file, key, f"{value!r} is not a size (write it like \"512K\", "
                          "\"64M\", \"1G\" or a number of bytes)")
    number = Fraction(m.group(1) + (m.group(2) or ""))
    return int(number * _SIZE_UNITS[(m.group(3) or "").upper()])


def show_value(value: object) -> str:
    """A TOML-ish rendering of a wrong value for an error message, cut at 60 characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
