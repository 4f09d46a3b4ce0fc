"""The rules of `flows/schema.py` on their own: which fields a JSONata mapping reads, and
which changes of metadata.out/in are incompatible (the end-to-end tests are test_schema.py)."""

from __future__ import annotations

from typing import Any

import pytest

from deployd.flows import schema
from deployd.flows.model import Step

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("expr", "paths"),
    [
        ('{"text": $uppercase(text), "n": n}', {("text",), ("n",)}),
        ("a.b.c", {("a", "b", "c")}),
        ("items[price > 3].name", {("items",)}),
        ("n > 3 ? x : y.z", {("n",), ("x",), ("y", "z")}),
        ('a & " " & $string(b.c)', {("a",), ("b", "c")}),
        ("$getPassthrough().tick.body.n", set()),
        ("$map(items, function($v) { $v.q })", {("items",)}),
        ('{"v": $getFlowVariables().p & t}', {("t",)}),
        ("[a, b]", {("a",), ("b",)}),
    ],
)
def test_the_fields_a_mapping_reads(expr: str, paths: set[tuple[str, ...]]) -> None:
    assert schema.mapping_paths(expr) == paths


def step(sid: str, kind: str, function: str, version: int, mapping: str | None = None) -> Step:
    return Step(
        id=sid,
        kind=kind,  # type: ignore[arg-type]
        component="c",
        function=function,
        version=version,
        pinned=False,
        mapping=mapping,
    )


def desc(out: Any, in_: Any) -> dict[str, Any]:
    return {
        "triggers": {"t": {"main": "t.py", "metadata": {"out": out}}},
        "actions": {"a": {"main": "a.py", "metadata": {"in": in_}}},
    }


OUT = {"type": "object", "properties": {"n": {"type": "integer"}, "o": {"type": "object"}}}
IN = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}


def check(new_out: Any, new_in: Any = IN, mapping: str | None = None) -> list[str]:
    before = [step("t", "trigger", "t", 1), step("a", "action", "a", 1, mapping)]
    after = [step("t", "trigger", "t", 2), step("a", "action", "a", 2, mapping)]
    descs = {("c", 1): desc(OUT, IN), ("c", 2): desc(new_out, new_in)}
    return schema.problems(schema.check(before, after, descs))


def test_an_integer_fits_a_number_and_an_unchanged_pair_is_fine() -> None:
    assert check(OUT) == []


def test_a_type_outside_what_the_consumer_takes_is_incompatible() -> None:
    out = {"type": "object", "properties": {"n": {"type": ["integer", "null"]}}}
    assert check(out) == [
        'step a: c v2 trigger "t" outputs "n" as integer or null, but a\'s metadata.in '
        "requires number"
    ]


def test_an_open_schema_is_never_a_false_alarm() -> None:
    assert check({"type": "object"}) == []  # no properties listed: nothing known missing
    assert check(OUT, mapping='{"x": o.deep.er}') == []  # o lists no properties
    edges = schema.check(
        [step("t", "trigger", "t", 1), step("a", "action", "a", 1)],
        [step("t", "trigger", "t", 2), step("a", "action", "a", 2)],
        {("c", 1): desc(OUT, IN), ("c", 2): desc({"type": 7}, IN)},
    )
    assert not edges[0].checked and "not a valid JSON Schema" in edges[0].note


def test_what_the_running_versions_already_lacked_is_not_reported() -> None:
    before = [step("t", "trigger", "t", 1), step("a", "action", "a", 1, "x")]
    after = [step("t", "trigger", "t", 2), step("a", "action", "a", 2, "x")]
    descs = {("c", 1): desc(OUT, IN), ("c", 2): desc(OUT, IN)}
    assert schema.problems(schema.check(before, after, descs)) == []  # x was never produced
