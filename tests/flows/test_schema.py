"""Schema compatibility between steps through real pushes and publishes, and
`validate_input = true` turning a message that does not match metadata.in into a dead letter."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.conftest import dead_letter_rows, wait_until
from tests.flows.conftest import FlowEnv, read_out
from tests.flows.schemas import MAPPING, TICK_OUT, WRITE_IN, desc, files, flow, retyped, without

pytestmark = pytest.mark.timeout(240)


def test_schema_checks_on_mapped_and_unmapped_edges_hold_an_incompatible_push(
    make_env: Any,
) -> None:
    env: FlowEnv = make_env(files())
    outs = {}
    for name, mapping in (("mapped", MAPPING), ("plain", None)):
        outs[name] = env.out(name)
        env.apply(flow(name, outs[name], mapping=mapping))
        wait_until(lambda o=outs[name]: read_out(o), timeout=60)

    # A compatible change (a new optional output property) publishes as before.
    more = copy.deepcopy(TICK_OUT)
    more["properties"]["extra"] = {"type": "boolean"}
    env.push(files("v2", tick_out=more), "compatible")
    env.wait_deploy("mapped", 2, timeout=60)
    env.wait_deploy("plain", 2, timeout=60)

    # "text" is no longer produced and "n" becomes a string: the mapped flow's mapping reads
    # "text", the plain flow's write requires an integer "n". Neither is published.
    env.push(files("v3", tick_out=retyped(without(TICK_OUT, "text"), "n", "string")), "break")

    def attention(name: str) -> Any:
        return (f := env.flow(name))["needs_attention"] and f

    mapped = wait_until(lambda: attention("mapped"), timeout=60)
    plain = wait_until(lambda: attention("plain"), timeout=60)
    assert mapped["needs_attention"] == (
        'step write: hello v3 trigger "ticker" no longer outputs "text" (write\'s mapping reads it)'
    )
    assert plain["needs_attention"] == (
        'step write: hello v3 trigger "ticker" outputs "n" as string, but write\'s metadata.in '
        "requires integer"
    )
    assert mapped["version"] == 2 and plain["version"] == 2  # v2's flows run on
    env.wait_more(outs["mapped"], 2)
    assert {r["by"] for r in read_out(outs["mapped"])[-2:]} == {"v2"}
    # The draft is kept with its problems and cannot be published.
    show = env.show("plain")
    assert show["draft"]["problems"] == [plain["needs_attention"]]
    refused = env.daemon.cli("flow", "publish", "plain", check=False)
    assert refused.returncode != 0 and 'outputs "n" as string' in refused.stderr

    # The consumer changing what it requires is checked too (write v4 now requires "sku",
    # which the trigger never declared).
    need_sku = copy.deepcopy(WRITE_IN)
    need_sku["properties"]["sku"] = {"type": "string"}
    need_sku["required"] = ["n", "sku"]
    env.push(files("v4", write_in=need_sku), "write needs sku")
    wait_until(lambda: "sku" in (env.flow("plain")["needs_attention"] or ""), timeout=60)
    assert env.flow("plain")["needs_attention"] == (
        'step write: hello v4 trigger "ticker" does not output "sku" (write\'s metadata.in '
        "requires it)"
    )
    # The mapped flow reads only text and n in its mapping: write's metadata.in is not
    # what it gives write, so only its mapping's reads are checked — and v4's trigger
    # still produces "text". It publishes.
    env.wait_deploy("mapped", 3, timeout=60)


VALIDATING = """\
name = "checked"
[[steps]]
id = "tick"
component = "hello"
function = "ticker"
interval = "50ms"
[[steps]]
id = "write"
component = "hello"
function = "write"
validate_input = true
config = {{ out = "{out}" }}
mapping = '{{"text": text, "n": n % 2 = 0 ? n : $string(n)}}'
"""


def refused_odd_messages(env: FlowEnv) -> None:
    """The VALIDATING flow runs: odd n reach write as strings and are refused before
    process(), kept as dead letters with the schema error; even n are written."""
    out = env.out("checked")
    env.apply(VALIDATING.format(out=out))
    wait_until(lambda: len(read_out(out)) >= 3, timeout=60)
    letters = wait_until(
        lambda: len(rows := dead_letter_rows(env.daemon.state_dir, "checked")) >= 2 and rows,
        timeout=60,
    )
    assert {r["n"] % 2 for r in read_out(out)} == {0}
    letter = letters[0]
    assert letter["step"] == "write" and letter["body"]["n"] == "1"
    assert 'input does not match metadata.in of hello v1 "write"' in letter["error"]
    assert "validate_input" in letter["error"] and "is not of type 'integer'" in letter["error"]
    listed = env.daemon.cli("flow", "errors", "checked", "--json").stdout
    assert "is not of type 'integer'" in listed


def test_validate_input_turns_a_message_that_does_not_match_into_a_dead_letter(
    make_env: Any,
) -> None:
    env: FlowEnv = make_env(files())
    refused_odd_messages(env)

    # Without a metadata.in to check against, validate_input is refused at apply.
    no_in = desc()
    del no_in["actions"]["write"]["metadata"]
    env.push(files("v2", **{"component.json": no_in}), "no metadata.in")
    text = VALIDATING.format(out=env.out("other")).replace('"checked"', '"other"')
    bad = env.apply(text, check=False)
    assert bad.returncode != 0
    assert 'validate_input = true, but hello v2 action "write" cannot be checked' in bad.stderr


def test_validate_input_on_rabbitmq(make_env: Any, amqp_url: str) -> None:
    """The RabbitMQ runner hands messages over with the same check."""
    toml = f'[runtime]\ndefault = "rabbitmq"\n[runtime.rabbitmq]\nurl = "{amqp_url}"\n'
    env: FlowEnv = make_env(files(), extra_toml=toml)
    refused_odd_messages(env)
