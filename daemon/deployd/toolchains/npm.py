"""The default build of a Node component, as the platform's Node buildpack does it.

Install with dev dependencies (`npm ci` when the lock file is accepted by the npm in use, else
`npm install`), run `npm test` when `package.json` has a test script, then remove the dev
dependencies (`npm prune --omit=dev`). Each command is an argument list (never a shell line).
Also here: reading npm's reason out of its output (its `npm error` lines without the usage
text it appends), and whether `engines.node` admits the node in use (npm's range grammar).
Pure functions; running the commands is the pipeline's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# npm does not phone home for audits, funding or updates; its cache lives next to the build's
# tree (removed with it), so nothing of one build is seen by another.
NPM_FLAGS = ("--no-audit", "--no-fund", "--no-update-notifier", "--cache", "../.npm-cache")
MAX_REASON = 600


def package_json(tree: Path) -> dict[str, Any] | None:
    """The parsed `package.json` of `tree` (None: none, or not a JSON object)."""
    try:
        data = json.loads((tree / "package.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def has_package_json(tree: Path) -> bool:
    return (tree / "package.json").is_file()


def install_ci() -> list[str]:
    """`npm ci` with dev dependencies (they are pruned after the tests)."""
    return ["npm", "ci", "--include=dev", *NPM_FLAGS]


def install() -> list[str]:
    """`npm install` with dev dependencies: without a lock file, or one `npm ci` refuses."""
    return ["npm", "install", "--include=dev", *NPM_FLAGS]


def test() -> list[str]:
    return ["npm", "test"]


def prune() -> list[str]:
    """Remove the dev dependencies from the built tree."""
    return ["npm", "prune", "--omit=dev", *NPM_FLAGS]


def has_lock_file(tree: Path) -> bool:
    return (tree / "package-lock.json").is_file() or (tree / "npm-shrinkwrap.json").is_file()


def has_test_script(pkg: dict[str, Any] | None) -> bool:
    """True when `package.json` names a test script (npm's placeholder that fails is one too)."""
    scripts = (pkg or {}).get("scripts")
    return isinstance(scripts, dict) and isinstance(scripts.get("test"), str)


def lock_refused(output: str) -> bool:
    """True when `npm ci` failed because it does not accept the lock file (EUSAGE: out of sync
    with package.json, or one this npm cannot read), so `npm install` may still succeed."""
    return bool(re.search(r"^npm (?:error|ERR!) code EUSAGE\s*$", output, re.MULTILINE))


def reason(output: str) -> str:
    """npm's reason for failing, on one line: its `npm error` lines, without the usage text it
    appends to EUSAGE errors and without the pointer to its debug log."""
    paragraphs: list[list[str]] = [[]]
    for raw in output.splitlines():
        match = re.match(r"^npm (?:error|ERR!) ?(.*)$", raw.rstrip())
        if match is None:
            continue
        text = match.group(1).strip()
        if not text:
            paragraphs.append([])
        elif not text.startswith(("A complete log of this run", "Log files were not written")):
            paragraphs[-1].append(text)
    paragraphs = [p for p in paragraphs if p]
    for i, para in enumerate(paragraphs):
        if para[0] == "Usage:":  # the command's summary line, then its usage and options
            paragraphs = paragraphs[: max(i - 1, 1)]
            break
    lines = list(dict.fromkeys(line for para in paragraphs for line in para))
    # npm ends a block with its bare tag ("npm error enoent"): no news
    lines = [x for x in lines if " " in x or not any(y.startswith(x + " ") for y in lines)]
    text = "; ".join(lines)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


# -- engines.node ------------------------------------------------------------------------------

_PART = r"(?:0|[1-9]\d*|[xX*])"
_PARTIAL_RE = re.compile(
    rf"^v?({_PART})(?:\.({_PART})(?:\.({_PART})(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?)?)?$"
)
_COMPARATOR_RE = re.compile(r"^(<=|>=|<|>|=|~>|~|\^)?\s*(\S*)$")
_NODE_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")

Version = tuple[int, int, int, int]  # major, minor, patch, 1 for a release (0: a pre-release)


class RangeError(ValueError):
    """`engines.node` is not a range npm would read."""


def _partial(text: str) -> tuple[list[int | None], bool]:
    """`1.2` → ([1, 2, None], False); `x`/`*`/missing parts are None; True for a pre-release."""
    match = _PARTIAL_RE.match(text)
    if match is None:
        raise RangeError(f"{text!r} is not a version")
    parts: list[int | None] = []
    for group in match.groups()[:3]:
        parts.append(None if group is None or group in "xX*" else int(group))
    for i in range(1, 3):  # once a part is a wildcard, the ones after it are too
        if parts[i - 1] is None:
            parts[i] = None
    return parts, match.group(4) is not None


def _v(major: int, minor: int = 0, patch: int = 0, release: int = 1) -> Version:
    return (major, minor, patch, release)


def _bounds(op: str, text: str) -> list[tuple[str, Version]]:
    """One comparator of a range as `(op, version)` bounds, all of which must hold."""
    if text in ("", "*", "x", "X"):
        return [] if op in ("", "=", ">=", "<=", "~", "~>", "^") else [("<", _v(0, 0, 0, 0))]
    (major, minor, patch), pre = _partial(text)
    assert major is not None or minor is None
    rel = 0 if pre else 1
    if major is None:
        return []
    if op in ("", "="):
        if minor is None:
            return [(">=", _v(major)), ("<", _v(major + 1, 0, 0, 0))]
        if patch is None:
            return [(">=", _v(major, minor)), ("<", _v(major, minor + 1, 0, 0))]
        return [(">=", _v(major, minor, patch, rel)), ("<=", _v(major, minor, patch, rel))]
    if op in ("~", "~>"):
        if minor is None:
            return [(">=", _v(major)), ("<", _v(major + 1, 0, 0, 0))]
        return [(">=", _v(major, minor, patch or 0, rel)), ("<", _v(major, minor + 1, 0, 0))]
    if op == "^":
        low = _v(major, minor or 0, patch or 0, rel)
        if major > 0 or minor is None:
            return [(">=", low), ("<", _v(major + 1, 0, 0, 0))]
        if minor > 0 or patch is None:
            return [(">=", low), ("<", _v(0, minor + 1, 0, 0))]
        return [(">=", low), ("<", _v(0, 0, patch + 1, 0))]
    if op == ">":
        if minor is None:
            return [(">=", _v(major + 1))]
        if patch is None:
            return [(">=", _v(major, minor + 1))]
        return [(">", _v(major, minor, patch, rel))]
    if op == ">=":
        return [(">=", _v(major, minor or 0, patch or 0, rel))]
    if op == "<":
        return [("<", _v(major, minor or 0, patch or 0, rel if patch is not None else 0))]
    # "<="
    if minor is None:
        return [("<", _v(major + 1, 0, 0, 0))]
    if patch is None:
        return [("<", _v(major, minor + 1, 0, 0))]
    return [("<=", _v(major, minor, patch, rel))]


def _hyphen(low: str, high: str) -> list[tuple[str, Version]]:
    (hmaj, hmin, hpat), pre = _partial(high)
    upper: list[tuple[str, Version]]
    if hmaj is None:
        upper = []
    elif hmin is None:
        upper = [("<", _v(hmaj + 1, 0, 0, 0))]
    elif hpat is None:
        upper = [("<", _v(hmaj, hmin + 1, 0, 0))]
    else:
        upper = [("<=", _v(hmaj, hmin, hpat, 0 if pre else 1))]
    return _bounds(">=", low) + upper


def _holds(version: Version, bounds: list[tuple[str, Version]]) -> bool:
    checks = {
        "<": version.__lt__,
        "<=": version.__le__,
        ">": version.__gt__,
        ">=": version.__ge__,
    }
    return all(checks[op](bound) for op, bound in bounds)


def satisfies(node_version: str, spec: str) -> bool:
    """Whether node `v20.1.0` is in npm range `spec` (`>=18`, `^14 || ^16`, `18.x`, `1 - 2`).

    Raises RangeError when `spec` is not a range npm would read.
    """
    match = _NODE_RE.match(node_version.strip())
    if match is None:
        raise RangeError(f"{node_version!r} is not a node version")
    version = _v(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    for alternative in spec.split("||"):
        text = re.sub(r"(<=|>=|<|>|=|~>|~|\^)\s+", r"\1", alternative.strip())
        hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", text)
        if hyphen:
            bounds = _hyphen(hyphen.group(1), hyphen.group(2))
        else:
            bounds = []
            for token in text.split():
                comp = _COMPARATOR_RE.match(token)
                if comp is None:
                    raise RangeError(f"{token!r} is not a comparator")
                bounds += _bounds(comp.group(1) or "", comp.group(2))
        if _holds(version, bounds):
            return True
    return False


def engines_warning(pkg: dict[str, Any] | None, node_version: str) -> str | None:
    """The warning when `package.json` `engines.node` does not admit `node_version`, or None.

    Not a failure: the platform runs such components too (npm only warns, EBADENGINE).
    """
    engines = (pkg or {}).get("engines")
    if not isinstance(engines, dict) or "node" not in engines:
        return None
    spec = engines["node"]
    if not isinstance(spec, str):
        return f"package.json engines.node is not a string ({spec!r}); it was not checked"
    try:
        ok = satisfies(node_version, spec)
    except RangeError as exc:
        return f"package.json engines.node {spec!r} cannot be read ({exc}); it was not checked"
    if ok:
        return None
    return (
        f"package.json engines.node {spec!r} is not satisfied by node {node_version} "
        "(daemon.node); the component may not work: install a matching node or widen the range"
    )
