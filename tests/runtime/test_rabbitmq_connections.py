"""The daemon's two connections to a real RabbitMQ: one publishes, one consumes.

On one connection the broker's flow control of a busy publisher held back the acks and
deliveries of every consumer on it (docs/benchmarks.md, "One connection or two"); these pin the
split, and that losing either connection is seen and recovered from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deployd.runtime.rabbitmq.broker import EXCHANGE, properties, routing_key
from deployd.runtime.rabbitmq.broker import Broker as AmqpBroker
from deployd.runtime.rabbitmq.runner import RabbitRunner
from deployd.types import StepKind
from tests.broker import Broker, connections, run_async, vhost_of
from tests.runtime.test_contract import (
    AMQP_URLS,
    PASS,
    Contract,
    assert_contiguous,
    scenario,
    until,
)

pytestmark = pytest.mark.timeout(120)


def consuming_channels(broker: Broker, vhost: str) -> list[dict[str, Any]]:
    out = broker.ctl(
        "list_channels", "name", "vhost", "consumer_count", "confirm", "--formatter", "json"
    )
    return [r for r in json.loads(out or "[]") if r["vhost"] == vhost]


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[AmqpBroker]:
    """deployd's broker connection to `url`, up (closed at the end)."""
    amqp = AmqpBroker(url)
    try:
        amqp.start()
        await amqp.wait(30)
        yield amqp
    finally:
        await amqp.close()


def test_publishes_and_consumers_go_on_connections_of_their_own(
    broker: Broker, amqp_url: str
) -> None:
    vhost = vhost_of(amqp_url)

    async def scenario() -> None:
        async with connected(amqp_url) as amqp:
            channel = await amqp.consumer_channel()
            queue = await amqp.declare_step("orders", "write", channel)

            async def ack(message: Any) -> None:
                await message.ack()

            await queue.consume(ack)

            conns = await asyncio.to_thread(connections, broker, vhost)
            by_name = {c["connection_name"]: c for c in conns}
            assert sorted(by_name) == ["deployd", "deployd consume"], conns
            channels = await asyncio.to_thread(consuming_channels, broker, vhost)
            consume_conn = by_name["deployd consume"]["name"]
            publish_conn = by_name["deployd"]["name"]
            consumers = [c for c in channels if c["consumer_count"]]
            assert consumers and all(c["name"].startswith(consume_conn) for c in consumers), (
                channels
            )
            # the publishing connection: the confirm channel, and no consumer
            publishing = [c for c in channels if c["name"].startswith(publish_conn)]
            assert publishing and not any(c["consumer_count"] for c in publishing), channels
            assert any(c["confirm"] for c in publishing), channels

    run_async(scenario)


@pytest.mark.parametrize("which", ["deployd consume", "deployd"])
def test_losing_either_connection_is_seen_and_both_come_back(
    broker: Broker, amqp_url: str, which: str
) -> None:
    """The broker closes one of the two (an operator's `close_connection`, a network cut):
    it is seen (`unreachable`, unless it is back already), then `connected` once that one is
    back, and `reconnects` counts it (what came on the old connection is stale for the loops)."""
    vhost = vhost_of(amqp_url)

    async def scenario() -> None:
        async with connected(amqp_url) as amqp:
            before = amqp.reconnects
            conns = await asyncio.to_thread(connections, broker, vhost)
            (pid,) = [c["pid"] for c in conns if c["connection_name"] == which]
            await asyncio.to_thread(broker.ctl, "close_connection", pid, "closed by the test")
            await until(lambda: amqp.state == "unreachable" or amqp.reconnects > before, "lost")
            await until(lambda: amqp.reconnects > before and amqp.state == "connected", "back")
            assert amqp.connected.is_set()
            # Both work again: a publish is confirmed and a consumer gets it.
            channel = await amqp.consumer_channel()
            queue = await amqp.declare_step("orders", "write", channel)
            got: asyncio.Queue[bytes] = asyncio.Queue()

            async def on(message: Any) -> None:
                await message.ack()
                await got.put(message.body)

            await queue.consume(on)
            await amqp.publish(EXCHANGE, routing_key("orders", "write"), b"{}", properties("m", {}))
            assert await asyncio.wait_for(got.get(), 30) == b"{}"
            conns = await asyncio.to_thread(connections, broker, vhost)
            assert sorted(c["connection_name"] for c in conns) == ["deployd", "deployd consume"]

    run_async(scenario)


def test_a_consumer_channel_the_broker_closes_is_consumed_on_anew(
    tmp_path: Path, amqp_url: str
) -> None:
    """The broker closes an action loop's channel under it (here: an ack of a delivery tag it
    never gave — a channel error; in production also its `consumer_timeout` after a long
    hold): the loop consumes again on a new channel, and the flow goes on with nothing lost,
    nothing twice, in order."""
    contract = Contract("rabbitmq", tmp_path)
    AMQP_URLS[contract.state] = amqp_url

    async def main() -> None:
        async with contract.session() as s:
            spec = contract.spec(
                1,
                contract.trigger(interval=0.02),
                contract.step("work", StepKind.ACTION, PASS),
                contract.sink(),
            )
            run = await s.start(spec)
            assert isinstance(run, RabbitRunner), type(run)
            await until(lambda: len(contract.rows()) >= 10, "messages flowing")
            consumer = run.consumers["work"]
            old = consumer.channel
            assert old is not None
            underlay = await old.get_underlay_channel()
            await underlay.basic_ack(10**9)  # unknown delivery tag: 406, the channel closes
            await until(lambda: consumer.channel is not old, "a new channel for the loop")
            have = len(contract.rows())
            await until(lambda: len(contract.rows()) >= have + 20, "messages flowing again")
            await run.stop()
            assert_contiguous(contract.rows())

    scenario(main())
