"""A trigger's `startup()` / `shutdown()` hooks, run in its pod when deployd asks.

    deployd ─ request ─▶ deployd.<flow>.<step>.v<N>.hooks ─▶ the trigger pod's Agent
            ◀─ reply ── amq.rabbitmq.reply-to (direct reply-to) ◀─ (its sailor ran the hook)

deployd decides when a hook runs, exactly as on one machine (`flows/publish.py`: startup once
when a flow version is first started, its result kept as the flow's `startup_data`; shutdown
with it at `flow stop`); the pod only runs one when asked, never by itself, so a pod restart
runs no startup.

- The queue is per flow version and declared by the trigger pod only (before it reports
  ready, so a warmed version always has it), with `x-expires`: what a killed daemon never
  deleted goes by itself once no pod consumes it. deployd deletes it with the version's
  objects (a stopped flow, a version replaced for good, a failed warm-up).
- `ask` (deployd): one channel per request; a passive declare first — no queue: no pod ever
  served this version, unanswered at once; no consumer: the pod is gone or restarting, so it
  waits `idle_wait` at most, not the whole timeout. The request's TTL is the wait, so one that
  nobody answered in time is never run later. The reply comes through direct reply-to (no
  reply queue to declare or delete).
- The pod acks a request when it takes it (a pod that dies during a hook does not run it
  again when it restarts: as a step process that dies during one on one machine), runs it on
  its sailor between two `process()` calls, and replies `{"data": …}` or `{"error": …}` (the
  hook's error, as the sailor reports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

REPLY_TO = "amq.rabbitmq.reply-to"
HOOKS = ("startup", "shutdown")
IDLE_WAIT = 5.0  # seconds an answer is waited for when no pod consumes the queue
# Never change: a pod declaring it with other arguments than the queue has is refused.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum", "x-expires": 3_600_000}


class HookUnanswered(Exception):
    """No trigger pod answered (no queue, no consumer, no answer in time, no broker)."""


class HookFailed(Exception):
    """The hook ran and failed: its error, as the sailor reported it."""


async def declare(channel: AbstractChannel, name: str) -> AbstractQueue:
    """The hooks queue `name` (the trigger pod's side)."""
    return await channel.declare_queue(name, durable=True, arguments=QUEUE_ARGUMENTS)


def reply(data: Any, error: str | None) -> bytes:
    """The pod's answer to a request: what the hook returned, or its error."""
    return json.dumps({"data": data} if error is None else {"error": error}).encode()


def reply_properties(correlation_id: str | None) -> spec.Basic.Properties:
    return spec.Basic.Properties(content_type="application/json", correlation_id=correlation_id)


async def ask(
    conn: AbstractConnection,
    queue: str,
    hook: str,
    data: Any,
    timeout: float,
    *,
    idle_wait: float = IDLE_WAIT,
) -> Any:
    """Run `hook` ("startup", or "shutdown" with `data`) in the pod consuming `queue`; what it
    returned. Raises `HookFailed` (it failed) or `HookUnanswered`."""
    if hook not in HOOKS:
        raise ValueError(f"not a trigger hook: {hook!r}")
    try:
        channel = await conn.channel()  # publisher confirms: an unroutable request is known
    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        raise HookUnanswered(f"no channel to the broker: {exc}") from None
    try:
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise HookUnanswered(f"no trigger pod declared {queue}") from None
        wait = timeout
        if not declared.declaration_result.consumer_count:
            wait = min(timeout, idle_wait)  # its pod is gone or not up (yet): not for long
        raw = await channel.get_underlay_channel()
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        cid = uuid.uuid4().hex

        async def got(message: DeliveredMessage) -> None:
            if message.header.properties.correlation_id == cid and not answer.done():
                answer.set_result(message.body)

        await raw.basic_consume(REPLY_TO, got, no_ack=True)  # before the request (the rule)
        props = spec.Basic.Properties(
            content_type="application/json",
            correlation_id=cid,
            reply_to=REPLY_TO,
            expiration=str(max(1, int(wait * 1000))),  # unanswered in time: never run later
        )
        body = json.dumps({"hook": hook, "data": data}).encode()
        sent = await raw.basic_publish(
            body, exchange="", routing_key=queue, properties=props, mandatory=True
        )
        if isinstance(sent, DeliveredMessage):  # returned: the queue went meanwhile
            raise HookUnanswered(f"{queue} is gone")
        try:
            text = await asyncio.wait_for(answer, wait)
        except TimeoutError:
            raise HookUnanswered(
                f"no answer within {wait:g} s"
                + ("" if wait == timeout else " (no trigger pod consumes its hooks queue)")
            ) from None
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        raise HookUnanswered(f"the broker: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    answered = json.loads(text)
    if answered.get("error") is not None:
        raise HookFailed(str(answered["error"]))
    return answered.get("data")
