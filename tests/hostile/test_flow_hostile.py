"""Hostile flow files: each gets its own FlowError or validation line, and nothing else.

Parsing (`model.parse`/`model.load`) is checked for every key wrong in turn, duplicate
step ids (a linear chain has no other way to loop), bad JSONata and bad durations;
`model.validate` for steps naming functions a component version does not have.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from deployd.errors import FlowError
from deployd.flows import model

HEAD = 'name = "counter"\n'
TICK = '[[steps]]\nid = "tick"\ncomponent = "hello"\nfunction = "ticker"\n'
WRITE = '[[steps]]\nid = "write"\ncomponent = "hello"\nfunction = "upper"\n'


def flow(head: str = HEAD, tick: str = TICK, write: str = WRITE) -> str:
    return head + tick + write


NOT_DURATION = "is not a duration; write a number and a unit"
ORD = HEAD + 'type = "ordinary"\n'
ORD1 = ORD + 'every = "1s"\n'

# (id, flow file text, expected words in the one-line error)
PARSE_CASES: list[tuple[str, str, str]] = [
    ("name-missing", flow(head=""), "name: Field required"),
    ("name-uppercase", flow(head='name = "Counter"\n'), "'Counter' is not a valid flow name"),
    ("name-traversal", flow(head='name = "../etc"\n'), "'../etc' is not a valid flow name"),
    ("name-shell", flow(head='name = "x;reboot"\n'), "'x;reboot' is not a valid flow name"),
    ("name-int", flow(head="name = 5\n"), "name: Input should be a valid string"),
    ("type-batch", flow(head=HEAD + 'type = "batch"\n'), "type: Input should be 'realtime'"),
    ("ordinary-no-schedule", flow(head=ORD), "give exactly one of schedule (cron"),
    ("ordinary-both", flow(head=ORD + 'every = "1s"\nschedule = "* * * * *"\n'), "not both"),
    ("cron-4-fields", flow(head=ORD + 'schedule = "* * * *"\n'), "it needs 5 fields"),
    ("cron-6-fields", flow(head=ORD + 'schedule = "0 * * * * *"\n'), "it has 6"),
    ("cron-minute-61", flow(head=ORD + 'schedule = "61 * * * *"\n'), "schedule: '61 * * * *'"),
    ("cron-hour-24", flow(head=ORD + 'schedule = "0 24 * * *"\n'), "is not a cron expression"),
    ("cron-word", flow(head=ORD + 'schedule = "hourly please"\n'), "needs 5 fields"),
    ("cron-weekday-9", flow(head=ORD + 'schedule = "0 9 * * 9"\n'), "0 and 7 are Sunday"),
    ("cron-shell", flow(head=ORD + 'schedule = "$(reboot) * * * *"\n'), "not a cron expression"),
    ("cron-empty", flow(head=ORD + 'schedule = ""\n'), "it needs 5 fields"),
    ("cron-int", flow(head=ORD + "schedule = 5\n"), "schedule: Input should be a valid string"),
    ("every-word", flow(head=ORD + 'every = "often"\n'), f"every: 'often' {NOT_DURATION}"),
    ("every-zero", flow(head=ORD + 'every = "0"\n'), "every: must be longer than 0"),
    ("every-negative", flow(head=ORD + "every = -5\n"), "a duration cannot be negative"),
    ("every-1ms", flow(head=ORD + 'every = "1ms"\n'), "every: must be at least 1s"),
    ("every-inf", flow(head=ORD + "every = inf\n"), "a duration must be a finite number"),
    ("run-timeout-word", flow(head=ORD1 + 'run_timeout = "long"\n'), NOT_DURATION),
    ("run-timeout-zero", flow(head=ORD1 + "run_timeout = 0\n"), "run_timeout: must be longer"),
    ("overlap-wait", flow(head=ORD1 + 'overlap = "wait"\n'), "overlap: Input should be 'skip'"),
    ("catch-up-all", flow(head=ORD1 + 'catch_up = "all"\n'), "catch_up: Input should be 'one'"),
    (
        "ordinary-http-trigger",
        flow(head=ORD1, tick='[[steps]]\nid = "in"\nbuiltin = "http"\nsecret = "${S}"\n'),
        "an ordinary flow's trigger is called once per run",
    ),
    (
        "schedule-on-realtime",
        flow(head=HEAD + 'every = "1s"\n'),
        'every: only for ordinary (scheduled) flows; add type = "ordinary"',
    ),
    ("update-sometimes", flow(head=HEAD + 'update = "sometimes"\n'), "update: Input should be"),
    ("unknown-top-key", flow(head=HEAD + "stesp = 1\n"), "stesp: unknown key"),
    ("no-steps", HEAD, "steps: Field required"),
    ("steps-a-string", HEAD + 'steps = "x"\n', "steps: Input should be a valid list"),
    ("one-step", HEAD + TICK, "a flow needs a trigger step and at least one action step"),
    ("steps-not-tables", HEAD + 'steps = ["a", "b"]\n', "steps[0]: must be a table"),
    (
        "duplicate-ids",
        flow(write=TICK.replace('"ticker"', '"upper"')),
        "step id 'tick' is used twice; step ids must be unique",
    ),
    ("id-space", flow(write=WRITE.replace('"write"', '"wr ite"')), "'wr ite' is not a valid step"),
    ("id-empty", flow(write=WRITE.replace('"write"', '""')), "'' is not a valid step id"),
    ("id-unicode", flow(write=WRITE.replace('"write"', '"wrïte"')), "'wrïte' is not a valid"),
    ("id-mapper-like", flow(write=WRITE.replace('"write"', '"write:mapper"')), "not a valid step"),
    ("id-missing", flow(write=WRITE.replace('id = "write"\n', "")), "steps[1].id: Field required"),
    (
        "component-bad",
        flow(write=WRITE.replace('"hello"', '"Hel lo"')),
        "'Hel lo' is not a valid component name",
    ),
    (
        "component-traversal",
        flow(write=WRITE.replace('"hello"', '"../hello"')),
        "'../hello' is not a valid component name",
    ),
    (
        "component-missing",
        flow(write=WRITE.replace('component = "hello"\n', "")),
        "steps[1].component: Field required",
    ),
    (
        "function-missing",
        flow(write=WRITE.replace('function = "upper"\n', "")),
        "steps[1].function: Field required",
    ),
    (
        "function-int",
        flow(write=WRITE.replace('"upper"', "3")),
        "steps[1].function: Input should be a valid string",
    ),
    (
        "function-empty",
        flow(write=WRITE.replace('"upper"', '""')),
        "steps[1].function: '' is not a function name",
    ),
    (
        "function-shell",
        flow(write=WRITE.replace('"upper"', '"$(reboot)"')),
        "'$(reboot)' is not a function name",
    ),
    (
        "interval-word",
        flow(tick=TICK + 'interval = "often"\n'),
        f"interval: 'often' {NOT_DURATION}",
    ),
    ("interval-unit", flow(tick=TICK + 'interval = "5 seconds"\n'), NOT_DURATION),
    ("interval-negative", flow(tick=TICK + "interval = -1\n"), "a duration cannot be negative"),
    ("interval-inf", flow(tick=TICK + "interval = inf\n"), "a duration must be a finite number"),
    ("interval-nan", flow(tick=TICK + "interval = nan\n"), "a duration must be a finite number"),
    ("interval-bool", flow(tick=TICK + "interval = true\n"), 'expected a duration such as "30s"'),
    ("config-a-string", flow(write=WRITE + 'config = "x"\n'), "steps[1].config: Input should be"),
    (
        "mapping-unclosed",
        flow(write=WRITE + "mapping = '{\"a\": '\n"),
        "steps[1].mapping: mapping is not valid JSONata",
    ),
    ("mapping-empty", flow(write=WRITE + 'mapping = ""\n'), "mapping is not valid JSONata"),
    ("mapping-int", flow(write=WRITE + "mapping = 5\n"), "mapping: Input should be a valid string"),
    (
        "mapping-deep",
        flow(write=WRITE + 'mapping = "' + "(" * 5000 + "1" + ")" * 5000 + '"\n'),
        "mapping is not valid JSONata",
    ),
    (
        "mapping-on-trigger",
        flow(tick=TICK + 'mapping = "x"\n'),
        "step tick: the trigger step cannot have a mapping",
    ),
    ("version-0", flow(write=WRITE + "version = 0\n"), "steps[1].version: Input should be greater"),
    ("version-word", flow(write=WRITE + 'version = "latest"\n'), "version: Input should be a"),
    ("version-float", flow(write=WRITE + "version = 1.5\n"), "fractional part"),
    ("step-unknown-key", flow(write=WRITE + 'mappnig = "x"\n'), "steps[1].mappnig: unknown key"),
    ("env-a-string", flow(write=WRITE + 'env = "A=1"\n'), "steps[1].env: must be a table of NAME"),
    ("env-int", flow(write=WRITE + "env = { A = 1 }\n"), "steps[1].env.A: must be a string"),
    ("env-bad-name", flow(write=WRITE + 'env = { "1A" = "x" }\n'), "'1A' is not a valid environ"),
    ("env-shell-name", flow(write=WRITE + 'env = { "A;B" = "x" }\n'), "'A;B' is not a valid"),
    ("env-path", flow(write=WRITE + 'env = { PATH = "/tmp" }\n'), "PATH is set by deployd"),
    ("env-home", flow(write=WRITE + 'env = { HOME = "/" }\n'), "HOME is set by deployd itself"),
    ("env-lang", flow(write=WRITE + 'env = { LANG = "C" }\n'), "LANG is set by deployd itself"),
    (
        "env-elasticio",
        flow(write=WRITE + 'env = { ELASTICIO_FLOW_ID = "x" }\n'),
        "ELASTICIO_FLOW_ID is set by deployd itself and cannot be overridden",
    ),
    ("env-deployd", flow(write=WRITE + 'env = { DEPLOYD_SPEC = "x" }\n'), "DEPLOYD_SPEC is set"),
    ("env-nul", flow(write=WRITE + 'env = { A = "x\\u0000" }\n'), "env 'A' holds a NUL"),
    ("variables-a-list", flow(head=HEAD + "variables = [1]\n"), "variables: must be a table"),
    ("variables-int", flow(head=HEAD + "variables = { a = 1 }\n"), "variables.a: must be a str"),
    (
        "variables-bad-name",
        flow(head=HEAD + 'variables = { "a b" = "x" }\n'),
        "'a b' is not a valid variable name",
    ),
]


@pytest.mark.parametrize(
    ("text", "words"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_every_key_wrong_in_turn(text: str, words: str) -> None:
    with pytest.raises(FlowError) as info:
        model.parse(tomllib.loads(text), "counter.toml")
    message = str(info.value)
    assert message.startswith("counter.toml is invalid: "), message
    assert words in message, message
    assert "\n" not in message and "instance of" not in message, message


def test_a_step_config_nested_too_deeply() -> None:
    """Deeper than a flow version can be stored: refused up front, not a 500 at apply."""
    deep: dict[str, object] = {}
    for _ in range(300):
        deep = {"a": deep}
    doc = tomllib.loads(flow())
    doc["steps"][1]["config"] = deep
    with pytest.raises(FlowError, match=r"steps\[1\]\.config: is nested more than 100 levels"):
        model.parse(doc, "counter.toml")


FILE_CASES: list[tuple[str, bytes | None, str]] = [
    ("missing", None, "does not exist"),
    ("not-toml", b'name = "x\n', "is not valid TOML"),
    ("not-utf8", b"\xff\xfe", "cannot be read"),
    ("a-directory", b"DIR", "cannot be read"),
    ("deep-nesting", b"a = " + b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read"),
]


@pytest.mark.parametrize(
    ("content", "words"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_unreadable_flow_files(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "flow.toml"
    if content == b"DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(FlowError) as info:
        model.load(path)
    assert str(path) in str(info.value) and words in str(info.value)


DESCRIPTORS: dict[tuple[str, int], dict[str, Any]] = {
    ("hello", 1): {
        "runtime": "python",
        "triggers": {"ticker": {"main": "lib/ticker.py"}},
        "actions": {
            "upper": {"main": "lib/upper.py", "fields": {"out": {"required": True}}},
        },
    },
    ("ruby", 1): {
        "runtime": "ruby",
        "triggers": {"ticker": {"main": "t.rb"}},
        "actions": {"upper": {"main": "u.rb"}},
    },
}

# (id, flow file text, recent versions, the expected problem line)
VALIDATE_CASES: list[tuple[str, str, dict[str, int | None], str]] = [
    (
        "unknown-action",
        flow(write=WRITE.replace('"upper"', '"lower"')),
        {"hello": 1},
        'step write: action "lower" does not exist in hello v1 (its actions: upper)',
    ),
    (
        "unknown-trigger",
        flow(tick=TICK.replace('"ticker"', '"tock"')),
        {"hello": 1},
        'step tick: trigger "tock" does not exist in hello v1 (its triggers: ticker)',
    ),
    (
        "action-as-trigger",
        flow(tick=TICK.replace('"ticker"', '"upper"')),
        {"hello": 1},
        "step tick: 'upper' is not a trigger of hello v1 (it is one of its actions",
    ),
    (
        "trigger-as-action",
        flow(write=WRITE.replace('"upper"', '"ticker"') + 'config = {out = "x"}\n'),
        {"hello": 1},
        "step write: 'ticker' is not an action of hello v1 (it is one of its triggers",
    ),
    (
        "required-field-missing",
        flow(),
        {"hello": 1},
        "step write: field 'out' is required by hello v1 but has no value in config",
    ),
    (
        "no-version-yet",
        flow(),
        {"hello": None},
        "step tick: component 'hello' has no version yet (push it)",
    ),
    (
        "pinned-version-missing",
        flow(write=WRITE + "version = 7\n"),
        {"hello": 1},
        "step write: hello v7 does not exist",
    ),
    (
        "unsupported-runtime",
        flow(tick=TICK.replace('"hello"', '"ruby"'), write=WRITE.replace('"hello"', '"ruby"')),
        {"ruby": 1},
        "step tick: runtime 'ruby' of ruby v1 is not supported",
    ),
]


@pytest.mark.parametrize(
    ("text", "recent", "line"),
    [c[1:] for c in VALIDATE_CASES],
    ids=[c[0] for c in VALIDATE_CASES],
)
def test_steps_a_component_version_cannot_run(
    text: str, recent: dict[str, int | None], line: str
) -> None:
    spec = model.parse(tomllib.loads(text))
    problems = model.validate(model.resolve(spec, recent), DESCRIPTORS)
    assert any(line in p for p in problems), problems


def test_node_steps_refused_when_node_cannot_run() -> None:
    spec = model.parse(tomllib.loads(flow(write=WRITE + 'config = {out = "x"}\n')))
    descs = {("hello", 1): {**DESCRIPTORS[("hello", 1)], "runtime": "node"}}
    problems = model.validate(model.resolve(spec, {"hello": 1}), descs, "node is not installed")
    assert "step tick: hello v1 cannot run: node is not installed" in problems
