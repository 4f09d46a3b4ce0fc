"""Parts of the RabbitMQ runtime that need no broker: redaction, names, envelopes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployd.metrics import Metrics
from deployd.runtime.rabbitmq.broker import queue_name, redact, routing_key
from deployd.runtime.rabbitmq.router import AmqpRouter, Inbound, _seen, envelope, members
from deployd.store import Store


@pytest.mark.parametrize(
    "url",
    [
        "amqp://user:secret@host:5672/v",
        "amqp://user:p@ss-secret@host/v",
        "AMQPS://user:secret@host/v",
        "amqp://user:pa/ss-secret@host/v",
    ],
)
def test_redact_hides_user_and_password_whatever_they_hold(url: str) -> None:
    out = redact(f"cannot connect to {url}: refused")
    assert "secret" not in out and "user" not in out, out
    assert out.endswith("host:5672/v: refused") or "host/v: refused" in out


def test_names_carry_flow_and_step() -> None:
    assert queue_name("orders", "write") == "deployd.orders.write"
    assert routing_key("orders", "write") == "orders.write"


def test_the_envelope_is_the_seed_platforms_message_shape() -> None:
    data = json.loads(envelope("m1", '{"n": 1}', '{"k": "v"}'))
    assert data == {
        "id": "m1",
        "body": {"n": 1},
        "headers": {"k": "v"},
        "attachments": {},
        "passthrough": {},
    }
    pt = '{"tick":{"id":"m0","body":{"n":1},"headers":{}}}'
    assert json.loads(envelope("m1", "{}", "{}", pt))["passthrough"] == json.loads(pt)


def test_a_delivery_carries_its_attachments_and_an_envelope_without_them_has_none(
    tmp_path: Path,
) -> None:
    """The reader of the broker's messages: `attachments` as the text that came; an envelope
    written before attachments travelled (no such member) is a message without any."""
    store = Store.open(tmp_path / "state.db")
    router = AmqpRouter(store, Metrics(), SimpleNamespace(reconnects=0))  # type: ignore[arg-type]
    files = '{"a.txt": {"url": "http://h/objects/x", "size": 1}}'

    def delivered(body: bytes) -> Inbound:
        msg = Inbound.__new__(Inbound)
        msg.body, msg.headers, msg.message_id = body, {}, "m1"
        msg.redelivered, msg.delivery_tag, msg.channel = False, 1, None  # type: ignore[assignment]
        return msg

    row = router.row("f", "s", delivered(envelope("m1", "{}", "{}", "{}", files)))
    assert row is not None and row.attachments == files
    old = router.row("f", "s", delivered(b'{"id":"m2","body":{},"headers":{},"passthrough":{}}'))
    assert old is not None and old.attachments == "{}" and old.msg_id == "m1"


def test_members_keep_each_values_text_as_it_came() -> None:
    text = envelope("m1", '{"n": 1, "s": "\u00e9"}', "{}", '{"a":{"body":[]}}').decode()
    got = members(text)
    assert got["body"] == ({"n": 1, "s": "\u00e9"}, '{"n": 1, "s": "\u00e9"}')
    assert got["id"] == ("m1", '"m1"')
    assert got["passthrough"][1] == '{"a":{"body":[]}}'
    assert members(' { "a" : [ 1 ] , "b" : null } ') == {"a": ([1], "[ 1 ]"), "b": (None, "null")}
    assert members("{}") == {}


@pytest.mark.parametrize(
    "text", ["", "[]", "null", '{"a":1', '{"a":1}x', '{"a" 1}', "{a:1}", '{"a":1,}', '{"a":}']
)
def test_members_refuse_what_is_not_one_json_object(text: str) -> None:
    with pytest.raises(ValueError):
        members(text)


def test_a_message_back_on_purpose_is_a_new_handling_a_redelivery_is_not() -> None:
    assert _seen("m1", 0, 0) == "m1"
    assert _seen("m1", 1, 0) != _seen("m1", 0, 0) != _seen("m1", 0, 1)
