"""The one error type the runtime raises for anything a user can fix.

Every failure a user can act on (bad config field, unknown id, wrong state) is a
`CorralError` whose message names the file, field or id; the CLI prints it and exits 1.
Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class CorralError(Exception):
    """A user-facing failure: the message is printed as is, exit status 1."""


class ConfigError(CorralError):
    """An invalid config.json (or resources file): the message names the field."""

    def __init__(self, field: str, problem: str, source: str = "config.json") -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: {field}: {problem}")
