"""Mapper steps: JSONata over a message body, evaluated in the router."""

from __future__ import annotations

import pytest

from deployd.errors import FlowError
from deployd.runtime import mapper


def test_an_object_result_is_the_new_body() -> None:
    assert mapper.apply('{"total": a + b}', {"a": 1, "b": 2}) == {"total": 3}


def test_a_scalar_result_is_wrapped_and_nothing_becomes_empty() -> None:
    assert mapper.apply("a", {"a": 5}) == {"value": 5}
    assert mapper.apply("missing", {"a": 5}) == {}


def test_an_invalid_expression_is_refused_at_compile_time_with_the_reason() -> None:
    with pytest.raises(ValueError, match="not valid JSONata"):
        mapper.compile_mapping("{{{")
    with pytest.raises(FlowError, match="not valid JSONata"):
        mapper.apply("{{{", {})


def test_a_runtime_failure_is_a_flow_error() -> None:
    with pytest.raises(FlowError, match="mapping failed"):
        mapper.apply("$error('boom')", {})


def test_compiled_expressions_are_cached() -> None:
    assert mapper.compile_mapping("a + 1") is mapper.compile_mapping("a + 1")


def test_get_flow_variables_returns_a_copy_of_the_flows_variables() -> None:
    """As in the components library's JSONata helper: `$getFlowVariables()` is the flow's
    variables ({} for a flow without any); what a mapping does to it changes nothing."""
    variables = {"region": "eu", "prefix": "hi"}
    expr = '{"where": $getFlowVariables().region, "text": $getFlowVariables().prefix & " " & t}'
    assert mapper.apply(expr, {"t": "x"}, None, variables) == {"where": "eu", "text": "hi x"}
    assert mapper.apply("$getFlowVariables()", {}) == {}
    assert variables == {"region": "eu", "prefix": "hi"}


def test_get_passthrough_returns_the_messages_passthrough() -> None:
    """As the components library's JSONata helper defines it: `$getPassthrough()` is the
    message's passthrough (stored JSON text or an object), {} when there is none."""
    pt = '{"tick":{"id":"a","body":{"text":"hi 1"},"headers":{}}}'
    expr = '{"n": n, "text": $getPassthrough().tick.body.text}'
    assert mapper.apply(expr, {"n": 1}, pt) == {"n": 1, "text": "hi 1"}
    assert mapper.apply(expr, {"n": 1}, {"tick": {"body": {"text": "x"}}})["text"] == "x"
    assert mapper.apply("$getPassthrough()", {"n": 1}) == {}
    assert mapper.apply('{"n": n}', {"n": 1}, "not decoded: the mapping does not ask") == {"n": 1}
