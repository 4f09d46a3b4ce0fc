"""Property-based fuzzing of the loaders: any input is a model or the loader's own error.

Inputs are near-valid documents with random values swapped in for known keys (so the
validators beyond the first are reached) and raw random bytes. The property: the config,
component.json and flow loaders never raise anything but ConfigError/ComponentError/
FlowError, and their messages are single lines a person can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployd import config as cfgmod
from deployd.errors import ComponentError, ConfigError, FlowError
from deployd.flows import model
from deployd.pipeline import descriptor

# Importing jsonata raises the recursion limit to 10,000 (once, for the process); do it
# before hypothesis runs, which refuses a limit changed during a test.
from deployd.runtime import mapper  # noqa: F401

FUZZ = settings(
    # DEPLOYD_FUZZ_EXAMPLES=5000 for a long hunt; the suite keeps it short.
    max_examples=int(os.environ.get("DEPLOYD_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "1s", "-1", "../x", "a\x00b", "$(reboot)", "ünï", "x" * 300]),
)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def mutated(base: dict[str, Any], keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """`base` with some known keys given random values, some dropped, some unknown added."""
    return st.builds(
        lambda swaps, drops, extra: {
            **{k: v for k, v in base.items() if k not in drops},
            **swaps,
            **extra,
        },
        st.dictionaries(st.sampled_from(keys), value, max_size=3),
        st.sets(st.sampled_from(list(base) or ["_"]), max_size=2),
        st.dictionaries(st.text(max_size=6), value, max_size=1),
    )


# -- config -----------------------------------------------------------------------------------

DAEMON_KEYS = list(cfgmod.DaemonConfig.model_fields)
COMPONENT_KEYS = list(cfgmod.ComponentConfig.model_fields)


def _no_nul_keys(doc: Any) -> bool:
    return "\x00" not in json.dumps(doc)


CREDENTIAL_KEYS = list(cfgmod.CredentialConfig.model_fields)

config_docs = st.builds(
    lambda daemon, comps, creds, top: {
        **top,
        "daemon": daemon,
        "components": comps,
        **({"credentials": creds} if creds is not None else {}),
    },
    mutated({"state_dir": "var", "listen": "127.0.0.1:8787"}, DAEMON_KEYS) | value,
    st.lists(mutated({"name": "hello"}, COMPONENT_KEYS) | value, max_size=3) | value,
    st.none()
    | st.lists(
        mutated({"name": "c", "component": "hello", "fields": {"k": "${HOME}"}}, CREDENTIAL_KEYS)
        | value,
        max_size=2,
    )
    | value,
    st.dictionaries(st.sampled_from(["path", "x", "daemon"]), value, max_size=1),
)


@FUZZ
@given(doc=config_docs)
def test_config_parse_raises_only_config_errors(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as base:
        try:
            cfg = cfgmod.parse(doc, base=Path(base))
        except ConfigError as exc:
            assert exc.problems, str(exc)
            for p in exc.problems:
                assert ": " in p and "\n" not in p, p
                assert "instance of" not in p, p
        else:
            assert isinstance(cfg, cfgmod.Config)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_config_load_of_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as base:
        path = Path(base) / "config.toml"
        path.write_bytes(data)
        with contextlib.suppress(ConfigError):
            cfgmod.load(path)


# -- component.json ---------------------------------------------------------------------------

BASE_DESC: dict[str, Any] = {
    "title": "Hello",
    "triggers": {"ticker": {"main": "./lib/ticker.py"}},
    "actions": {"upper": {"main": "./lib/upper.py", "fields": {"out": {"required": True}}}},
}
FUNCTION_KEYS = ["main", "title", "type", "fields", "metadata", "description"]
function = mutated({"main": "./lib/upper.py"}, FUNCTION_KEYS)
descriptors = st.builds(
    lambda top, trig, act: {**top, "triggers": trig, "actions": act},
    mutated({"title": "Hello"}, list(descriptor.Descriptor.model_fields)),
    st.dictionaries(text, function | value, max_size=2) | value,
    st.dictionaries(text, function | value, max_size=2) | value,
)


def _load_tree(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as base:
        tree = Path(base)
        (tree / "lib").mkdir()
        (tree / "lib/upper.py").write_text("")
        (tree / "lib/ticker.py").write_text("")
        (tree / "component.json").write_bytes(data)
        try:
            desc = descriptor.load(tree)
        except ComponentError as exc:
            message = str(exc)
            assert message and "\n" not in message and "instance of" not in message, message
        else:
            assert desc.triggers or desc.actions


@FUZZ
@given(doc=descriptors)
def test_component_json_documents(doc: dict[str, Any]) -> None:
    _load_tree(json.dumps(doc).encode())


@FUZZ
@given(data=st.binary(max_size=300))
def test_component_json_random_bytes(data: bytes) -> None:
    _load_tree(data)


# -- flow files -------------------------------------------------------------------------------

STEP_KEYS = list(model.StepSpec.model_fields)
step = mutated({"id": "s", "component": "hello", "function": "upper"}, STEP_KEYS)
flows = st.builds(
    lambda top, steps: {**top, "steps": steps},
    mutated({"name": "counter"}, ["name", "type", "update"]),
    st.lists(step | value, max_size=4) | value,
)


@FUZZ
@given(doc=flows)
def test_flow_documents(doc: dict[str, Any]) -> None:
    try:
        spec = model.parse(doc, "flow.toml")
    except FlowError as exc:
        message = str(exc)
        assert message.startswith("flow.toml is invalid: ") and "\n" not in message, message
        assert "instance of" not in message, message
    else:
        steps = model.resolve(spec, {"hello": 1})
        problems = model.validate(steps, {("hello", 1): BASE_DESC})
        assert all(p.startswith("step ") for p in problems), problems


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_flow_files_of_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as base:
        path = Path(base) / "flow.toml"
        path.write_bytes(data)
        with contextlib.suppress(FlowError):
            model.load(path)


@FUZZ
@given(doc=flows)
def test_flow_files_written_as_toml(doc: dict[str, Any]) -> None:
    """The same documents through TOML text, as `flow apply` reads them."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if isinstance(v, str | int)]
    source = "\n".join(lines)
    try:
        raw = tomllib.loads(source)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(FlowError):
        model.parse(raw)
