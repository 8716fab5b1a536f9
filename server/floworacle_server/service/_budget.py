"""The server's memory budget for requests in flight: bytes received and not yet answered, plus
answers made and not yet handed to gRPC, per stream and in total.

gRPC bounds what sits in its own buffers through HTTP/2 flow control (a stream's window, a few MB
at most); everything the server itself holds for a call passes through a :class:`ByteBudget`:
a unary call that does not fit is refused with RESOURCE_EXHAUSTED and a retry hint, a stream
message that does not fit is simply not read until it does, so the sender is held back by flow
control. One item is always admitted when nothing is in flight, so a single request larger than
the budget still runs (alone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["ByteBudget"]

log = logging.getLogger(__name__)


class ByteBudget:
    """Bytes in use against a limit, on one event loop.

    Args:
        limit: most bytes in use at once (an item is admitted anyway when nothing is in use).
        parent: a budget that every take and give also goes to (a stream's budget has the
            server's as parent).
        on_idle: called with the bytes handed back since the last call whenever the use returns to 0.
    """

    def __init__(
        self, limit: int, parent: ByteBudget | None = None, on_idle: Callable[[int], None] | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget needs a limit >= 1, got {limit}")
        self.limit = limit
        self.parent = parent
        self._on_idle = on_idle
        self._used = 0
        self._freed = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def used(self) -> int:
        return self._used

    def _chain(self) -> list[ByteBudget]:
        return [self] if self.parent is None else [self, *self.parent._chain()]

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes now if they fit here and in every parent; False (nothing taken) otherwise."""
        if not all(b._used == 0 or b._used + n <= b.limit for b in self._chain()):
            return False
        self.force(n)
        return True

    async def take(self, n: int) -> None:
        """Take ``n`` bytes, waiting until they fit here and in every parent."""
        while not self.try_take(n):
            waiter = asyncio.get_running_loop().create_future()
            chain = self._chain()
            for b in chain:  # woken by a give anywhere on the chain
                b._waiters.append(waiter)
            try:
                await waiter
            finally:
                for b in chain:
                    if waiter in b._waiters:
                        b._waiters.remove(waiter)

    def force(self, n: int) -> None:
        """Take ``n`` bytes whether or not they fit (an answer that already exists)."""
        for b in self._chain():
            b._used += n

    def give(self, n: int) -> None:
        """Hand ``n`` bytes back (and wake whoever waits for room)."""
        for b in self._chain():
            b._used -= n
            b._freed += n
            for waiter in b._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            if b._used == 0 and b._on_idle is not None:
                freed, b._freed = b._freed, 0
                b._on_idle(freed)
