"""corrald's event log: a bounded ring of numbered events for ``GET /v1/events``.

Every state change, exit, OOM kill, reload and control action becomes one event with a
sequence number that only grows (1, 2, 3, ... for the daemon's lifetime). The ring keeps the
last `EventRing.capacity` of them, so memory stays bounded however long corrald runs and
however slow a reader is: a reader asks for what is newer than the last number it saw
(``?since=SEQ``) and is told plainly when some of that fell out of the ring (`Gap`), instead
of the daemon buffering for it. Followers wait on `EventRing.wait_after`.

Each event is encoded to its JSON line once, when it is added: a hundred followers cost one
``json.dumps`` per event, not a hundred.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import attrs
import trio
from corral.runtime._state import rfc3339_now

__all__ = ["DEFAULT_CAPACITY", "Event", "EventRing", "Gap"]

DEFAULT_CAPACITY = 1000


@attrs.frozen
class Event:
    """One event: its number, its fields (``seq``, ``time``, ``type`` first) and its line."""

    seq: int
    fields: dict[str, Any]
    line: bytes  # the JSON object and a newline


@attrs.frozen
class Gap:
    """Events after `since` up to `oldest` - 1 are gone from the ring: `missed` of them.

    With `reset`, `since` is beyond the newest event: it was seen by a reader of an earlier
    corrald (numbers start again at 1 with each daemon), and every event kept is new to it.
    """

    since: int
    oldest: int
    reset: bool = False

    @property
    def missed(self) -> int | None:
        return None if self.reset else self.oldest - self.since - 1

    def as_event(self) -> dict[str, Any]:
        """What a reader is sent first, as an event of type ``gap`` (without a ``seq``)."""
        return {"seq": None, "type": "gap", "since": self.since, "oldest": self.oldest,
                "missed": self.missed, "reset": self.reset}


@attrs.define(eq=False)
class EventRing:
    """The last `capacity` events, numbered from 1.

    Example:
        >>> ring = EventRing(capacity=2)
        >>> for i in range(3):
        ...     _ = ring.add("state", "web", to=str(i))
        >>> [e.seq for e in ring.since(0)[0]], ring.since(0)[1]
        ([2, 3], Gap(since=0, oldest=2))
    """

    capacity: int = DEFAULT_CAPACITY
    _items: collections.deque[Event] = attrs.field(init=False)
    _next: int = attrs.field(init=False, default=1)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)

    @_items.default
    def _items_default(self) -> collections.deque[Event]:
        if self.capacity < 1:
            raise ValueError(f"an event ring needs a capacity of at least 1, not {self.capacity}")
        return collections.deque(maxlen=self.capacity)

    @property
    def last_seq(self) -> int:
        """The number of the newest event; 0 before the first."""
        return self._next - 1

    @property
    def oldest_seq(self) -> int:
        """The number of the oldest event still kept (`last_seq` + 1 when empty)."""
        return self._items[0].seq if self._items else self._next

    def add(self, type: str, container: str | None = None, **fields: Any) -> Event:
        """Record an event now; wakes every follower. Synchronous: safe from any trio task.

        Args:
            type: ``state``, ``exit``, ``oom``, ``reload``, ``action``...
            container: the container's name, when it is about one.
            fields: the rest of the event (JSON-serialisable).
        """
        body: dict[str, Any] = {"seq": self._next, "time": rfc3339_now(), "type": type}
        if container is not None:
            body["container"] = container
        body.update(fields)
        line = json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n"
        event = Event(self._next, body, line)
        self._items.append(event)
        self._next += 1
        self._changed.set()
        self._changed = trio.Event()
        return event

    def since(self, seq: int) -> tuple[list[Event], Gap | None]:
        """The events numbered above `seq`, oldest first, and the `Gap` when some are gone.

        `last_seq` gives no events; a negative `seq` counts as 0, one above `last_seq` (from
        an earlier daemon) as 0 with a `Gap` that says ``reset``.
        """
        seq = max(seq, 0)
        oldest = self.oldest_seq
        if seq > self.last_seq:
            return list(self._items), Gap(seq, oldest, reset=True)
        gap = Gap(seq, oldest) if seq < oldest - 1 else None
        if seq == self.last_seq:
            return [], gap
        # Sequence numbers are consecutive in the ring: index straight to the first one.
        start = max(seq + 1 - oldest, 0)
        items = self._items
        return [items[i] for i in range(start, len(items))], gap

    async def wait_after(self, seq: int) -> None:
        """Return once an event numbered above `seq` exists."""
        while self.last_seq <= seq:
            await self._changed.wait()
