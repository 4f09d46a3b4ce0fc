"""Hostile component.json files and trees: each is refused with its own clear ComponentError.

Every field wrong in turn, `main` escaping the tree (`..`, absolute, symbolic links),
enormous and deeply nested files. `descriptor.load` is called directly on a tree.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployd.errors import ComponentError
from deployd.pipeline import descriptor

BASE: dict[str, Any] = {
    "title": "Hello",
    "triggers": {"ticker": {"main": "./lib/ticker.py", "title": "Ticker"}},
    "actions": {"upper": {"main": "./lib/upper.py", "title": "Upper"}},
}


def desc(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    out.update(changes)
    return out


def action(**fields: Any) -> dict[str, Any]:
    return desc(actions={"upper": {"main": "./lib/upper.py", **fields}})


def trigger_main(main: Any) -> dict[str, Any]:
    return desc(triggers={"ticker": {"main": main}})


# (id, component.json as an object, expected words)
FIELD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("title-int", desc(title=5), "component.json title: Input should be a valid string"),
    ("title-list", desc(title=["a"]), "component.json title: Input should be a valid string"),
    ("description-object", desc(description={}), "component.json description: Input should be"),
    ("version-int", desc(version=1), "component.json version: Input should be a valid string"),
    ("version-v-prefix", desc(version="v1.0.0"), "'v1.0.0' is not a semantic version"),
    ("version-leading-zero", desc(version="01.0.0"), "'01.0.0' is not a semantic version"),
    ("version-two-parts", desc(version="1.2"), "'1.2' is not a semantic version"),
    ("runtime-ruby", desc(runtime="ruby"), "component.json runtime: Input should be 'python'"),
    ("runtime-capital", desc(runtime="Python"), "component.json runtime: Input should be"),
    ("build-int", desc(build=5), "component.json build: Input should be a valid string"),
    ("build-list", desc(build=["make"]), "component.json build: Input should be a valid string"),
    ("test-bool", desc(test=True), "component.json test: Input should be a valid string"),
    ("fields-list", desc(fields=[]), "component.json fields: Input should be a valid dictionary"),
    ("triggers-list", desc(triggers=["ticker"]), "component.json triggers: Input should be"),
    ("triggers-null", desc(triggers=None), "component.json triggers: Input should be"),
    (
        "trigger-a-string",
        desc(triggers={"ticker": "./lib/ticker.py"}),
        "component.json triggers.ticker: must be a JSON object",
    ),
    ("trigger-no-main", desc(triggers={"ticker": {}}), "triggers.ticker.main: Field required"),
    ("main-int", trigger_main(5), "triggers.ticker.main: Input should be a valid string"),
    ("main-empty", trigger_main(""), "'' must be a relative path inside the component"),
    ("main-nul", trigger_main("lib/\u0000x.py"), "must be a relative path inside the component"),
    ("main-dotdot", trigger_main("../x.py"), "'../x.py' escapes the component tree"),
    ("main-inner-dotdot", trigger_main("lib/../../x.py"), "escapes the component tree"),
    ("main-absolute", trigger_main("/etc/passwd"), "must be a relative path inside"),
    ("main-missing", trigger_main("./lib/nope.py"), "file './lib/nope.py' does not exist"),
    ("main-a-directory", trigger_main("lib"), "'lib' is a directory; name the module file"),
    ("main-tilde", trigger_main("~/x.py"), "file '~/x.py' does not exist"),
    (
        "fields-of-function-list",
        action(fields=["out"]),
        "actions.upper.fields: Input should be a valid dictionary",
    ),
    ("field-spec-string", action(fields={"out": "x"}), "actions.upper.fields.out: must be a JSON"),
    (
        "field-label-int",
        action(fields={"out": {"label": 3}}),
        "actions.upper.fields.out.label: Input should be a valid string",
    ),
    ("metadata-list", action(metadata=[]), "actions.upper.metadata: Input should be a valid"),
    ("function-type-int", action(type=1), "actions.upper.type: Input should be a valid string"),
    (
        "function-name-space",
        desc(actions={"a b": {"main": "lib/upper.py"}}),
        "'a b' is not a valid function name",
    ),
    (
        "function-name-unicode",
        desc(actions={"ünï": {"main": "lib/upper.py"}}),
        "'ünï' is not a valid function name",
    ),
    (
        "function-name-shell",
        desc(actions={"$(reboot)": {"main": "lib/upper.py"}}),
        "'$(reboot)' is not a valid function name",
    ),
    (
        "function-name-empty",
        desc(actions={"": {"main": "lib/upper.py"}}),
        "'' is not a valid function name",
    ),
    ("no-functions", {"title": "x"}, "declares no triggers and no actions; add at least one"),
    ("empty-functions", desc(triggers={}, actions={}), "declares no triggers and no actions"),
]

# (id, component.json bytes, expected words)
RAW_CASES: list[tuple[str, bytes, str]] = [
    ("empty-file", b"", "component.json is not valid JSON: Expecting value at line 1"),
    ("truncated", b'{"title": "x", "triggers": {', "is not valid JSON"),
    ("utf8-bom", b"\xef\xbb\xbf" + json.dumps(BASE).encode(), "Unexpected UTF-8 BOM"),
    ("latin-1", b'{"title": "\xe9"}', "component.json is not UTF-8 text"),
    ("array", b"[1]", "component.json must hold a JSON object"),
    ("null", b"null", "component.json must hold a JSON object"),
    ("string", b'"x"', "component.json must hold a JSON object"),
    ("nan-title", b'{"title": NaN}', "component.json title: Input should be a valid string"),
    ("deep-array", b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read"),
    (
        "deep-object",
        b'{"title": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}",
        "nested too deeply to read",
    ),
    (
        "enormous",
        b'{"title": "' + b"x" * (descriptor.MAX_DESCRIPTOR_BYTES + 1) + b'"}',
        f"the limit is {descriptor.MAX_DESCRIPTOR_BYTES} bytes",
    ),
    ("huge-number", b'{"version": ' + b"9" * 5000 + b"}", "a number with too many digits"),
    (
        "nested-300-levels",
        b'{"metadata": ' + b"[" * 300 + b"]" * 300 + b"}",
        "nested more than 100 levels deep",
    ),
]


def make_tree(root: Path, content: dict[str, Any] | bytes) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "lib/ticker.py").write_text("def process(msg, cfg):\n    return {}\n")
    (root / "lib/upper.py").write_text("def process(msg, cfg):\n    return {}\n")
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (root / "component.json").write_bytes(data)
    return root


def refused(tree: Path) -> str:
    with pytest.raises(ComponentError) as info:
        descriptor.load(tree)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert "instance of" not in message, message  # no pydantic class names
    return message


def test_the_base_tree_is_valid(tmp_path: Path) -> None:
    assert descriptor.load(make_tree(tmp_path, BASE)).runtime == "python"


@pytest.mark.parametrize(
    ("content", "words"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_every_field_wrong_in_turn(tmp_path: Path, content: dict[str, Any], words: str) -> None:
    assert words in refused(make_tree(tmp_path, content))


@pytest.mark.parametrize(
    ("content", "words"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_malformed_and_enormous_files(tmp_path: Path, content: bytes, words: str) -> None:
    assert words in refused(make_tree(tmp_path, content))


def _link_upper(target: str) -> Callable[[Path], None]:
    def change(tree: Path) -> None:
        (tree / "lib/upper.py").unlink()
        os.symlink(target, tree / "lib/upper.py")

    return change


def _link_dir(tree: Path) -> None:
    os.symlink("/etc", tree / "etc")
    data = desc(actions={"upper": {"main": "etc/passwd"}})
    (tree / "component.json").write_text(json.dumps(data))


def _descriptor_dir(tree: Path) -> None:
    (tree / "component.json").unlink()
    (tree / "component.json").mkdir()


def _descriptor_link(tree: Path) -> None:
    (tree / "real.json").write_text(json.dumps(BASE))
    (tree / "component.json").unlink()
    os.symlink("real.json", tree / "component.json")


def _no_descriptor(tree: Path) -> None:
    (tree / "component.json").unlink()


TREE_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("symlink-absolute", _link_upper("/etc/passwd"), "points outside the component tree"),
    ("symlink-relative-out", _link_upper("../../../../../../../etc/passwd"), "points outside"),
    ("symlinked-directory", _link_dir, "'etc/passwd' points outside the component tree"),
    ("symlink-loop", _link_upper("upper.py"), "cannot be resolved (a symbolic link loop?)"),
    ("symlink-dangling", _link_upper("gone.py"), "file './lib/upper.py' does not exist"),
    ("component-json-a-directory", _descriptor_dir, "must be a regular file, not a directory"),
    ("component-json-a-symlink", _descriptor_link, "not a symbolic link"),
    ("component-json-missing", _no_descriptor, "component.json is missing at the root"),
]


@pytest.mark.parametrize(
    ("change", "words"), [c[1:] for c in TREE_CASES], ids=[c[0] for c in TREE_CASES]
)
def test_trees_escaping_or_broken(
    tmp_path: Path, change: Callable[[Path], None], words: str
) -> None:
    tree = make_tree(tmp_path, BASE)
    change(tree)
    assert words in refused(tree)
