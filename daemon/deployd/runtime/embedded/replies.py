"""Who waits for an `httpReply`: the sync requests of HTTP-fed flows, by message.

A request's message id is the key; every message the flow makes from it (the outputs of the
step that handles it, and theirs) is mapped to that key as the router queues it, so whichever
step emits `httpReply` while handling one of them answers the request. The first reply wins;
once the answer is sent or given up (`forget`), later replies and the ids are dropped. Held in
memory only: a request's connection does not outlive the daemon, nor does its waiter.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Replies:
    def __init__(self) -> None:
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self._key_of: dict[str, str] = {}  # message id -> the request's key
        self._ids: dict[str, list[str]] = {}  # key -> every message id mapped to it

    def __bool__(self) -> bool:
        return bool(self._key_of)

    def wait(self, msg_id: str) -> asyncio.Future[Any]:
        """The future of the first reply to the request whose message is `msg_id`."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        self._key_of[msg_id] = msg_id
        self._ids[msg_id] = [msg_id]
        return fut

    def inherit(self, parent: str, child: str) -> None:
        """`child` was made from `parent`: a reply while handling it answers the same request."""
        key = self._key_of.get(parent)
        if key is not None:
            self._key_of[child] = key
            self._ids[key].append(child)

    def answer(self, msg_id: str, reply: Any) -> bool:
        """A step emitted httpReply while handling `msg_id`; whether it answered a request."""
        key = self._key_of.get(msg_id)
        fut = self._waiters.get(key) if key is not None else None
        if fut is None or fut.done():
            return False
        fut.set_result(reply)
        return True

    def forget(self, msg_id: str) -> None:
        """The request of `msg_id` was answered or given up."""
        self._waiters.pop(msg_id, None)
        for other in self._ids.pop(msg_id, ()):
            self._key_of.pop(other, None)
