"""Schema compatibility between the steps of a flow (`metadata.in` / `metadata.out`).

Functions may declare what they take and give as JSON Schema in component.json, the seed
platform's convention: `"metadata": {"in": {...}, "out": {...}}`, each `{"type": "object",
"properties": {...}, "required": [...]}`. When a draft moves a step to another component
version, every edge it touches (the step and the one before it, the step and the one after)
is checked: what the producer's `out` now guarantees against what the consumer needs — its
mapping's field paths when it has a `mapping`, else its `in` schema's required properties and
their types. Only what the change broke is reported: a problem the same check also finds on
the versions that run now is not the draft's.

`jsonschema` checks that a schema is one (`check_schema`); the compatibility rules over the
keywords below are deployd's own, and deliberately few: `type` (a string or a list;
`integer` fits `number`), `properties` (nested, for paths through objects), `required` (the
list, and the platform's `"required": true` on a property). Anything else (`oneOf`, `$ref`,
`additionalProperties`, `items`, formats…) is not reasoned about: a field is only reported
missing when the producer's schema lists `properties` and that name is not among them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from ..runtime.mapper import compile_mapping
from . import model

Descriptors = dict[tuple[str, int], dict[str, Any]]
Path = tuple[str, ...]

_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


@dataclass
class Edge:
    """The check of one edge `producer → consumer` of a flow."""

    producer: str
    consumer: str
    checked: bool
    note: str  # what was compared, or why it was not checked
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "producer": self.producer,
            "consumer": self.consumer,
            "checked": self.checked,
            "note": self.note,
            "problems": list(self.problems),
        }


def function_of(desc: dict[str, Any] | None, step: model.Step) -> dict[str, Any] | None:
    if desc is None:
        return None
    group = "triggers" if step.kind == "trigger" else "actions"
    func = (desc.get(group) or {}).get(step.function)
    return func if isinstance(func, dict) else None


def schema_of(func: dict[str, Any] | None, which: str) -> tuple[dict[str, Any] | None, str]:
    """(`metadata.<which>` of `func` when it is a usable JSON Schema, else None, and why)."""
    if func is None:
        return None, "no such function"
    if func.get("dynamicMetadata") is True:
        return None, "its metadata is dynamic (getMetaModel)"
    meta = func.get("metadata")
    schema = meta.get(which) if isinstance(meta, dict) else None
    if not isinstance(schema, dict) or not schema:
        return None, f"it has no metadata.{which}"
    problem = schema_problem(schema)
    if problem is not None:
        return None, f"its metadata.{which} is not a valid JSON Schema ({problem})"
    return schema, ""


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a JSON Schema (None: it is one), as jsonschema says."""
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{exc.message}" + (f" at {where}" if where else "")
    except Exception as exc:  # a $schema naming an unknown draft, a bad regex...
        return f"{type(exc).__name__}: {exc}"
    return None


def check(
    before: Sequence[model.Step] | None,
    after: Sequence[model.Step],
    descriptors: Descriptors,
    label: Any = None,
) -> list[Edge]:
    """The edges of `after` touched by a component version change against `before` (the
    steps that run now), each checked. `label(component, version)` names a version in
    messages (default `hello v5`)."""
    if before is None:
        return []
    name = label or (lambda comp, ver: f"{comp} v{ver}")
    old = {s.id: s for s in before}
    changed = {s.id for s in after if s.id in old and _ref(old[s.id]) != _ref(s)}
    out = []
    for i in range(1, len(after)):
        prod, cons = after[i - 1], after[i]
        if prod.id not in changed and cons.id not in changed:
            continue
        out.append(_edge(prod, cons, old, descriptors, name))
    return out


def _ref(step: model.Step) -> tuple[str, int | None]:
    return step.component, step.version


def problems(edges: Sequence[Edge]) -> list[str]:
    return [p for e in edges for p in e.problems]


def _desc(descriptors: Descriptors, step: model.Step) -> dict[str, Any] | None:
    return None if step.version is None else descriptors.get((step.component, step.version))


def _edge(
    prod: model.Step,
    cons: model.Step,
    old: dict[str, model.Step],
    descriptors: Descriptors,
    name: Any,
) -> Edge:
    edge = Edge(prod.id, cons.id, checked=False, note="")
    pfunc = function_of(_desc(descriptors, prod), prod)
    cfunc = function_of(_desc(descriptors, cons), cons)
    if pfunc is None or cfunc is None:
        edge.note = "not checked: a function is missing (see the validation problems)"
        return edge
    out, why = schema_of(pfunc, "out")
    if out is None:
        edge.note = f"not checked: step {prod.id} ({name(prod.component, prod.version)}): {why}"
        return edge
    needs, source, why = _needs(cons, cfunc)
    if needs is None:
        edge.note = f"not checked: step {cons.id} ({name(cons.component, cons.version)}): {why}"
        return edge
    edge.checked = True
    edge.note = f"metadata.out of {prod.id} against {source}"
    new = _missing(out, needs)
    # What the versions that run now already lacked is not this draft's doing.
    before = _old_missing(prod, cons, old, descriptors)
    was_out = _old_out(prod, old, descriptors)
    ref = f'{name(prod.component, prod.version)} {_kind(prod)} "{prod.function}"'
    for (path, kind), detail in new.items():
        if (path, kind) in before:
            continue
        dotted = ".".join(path)
        if kind == "missing":
            had = was_out is not None and not _missing(was_out, {path: None})
            verb = "no longer outputs" if had else "does not output"
            why = "reads" if cons.mapping is not None else "requires"
            edge.problems.append(f'step {cons.id}: {ref} {verb} "{dotted}" ({source} {why} it)')
        else:
            edge.problems.append(
                f'step {cons.id}: {ref} outputs "{dotted}" as {detail[0]}, but {source} '
                f"requires {detail[1]}"
            )
    return edge


def _needs(
    cons: model.Step, cfunc: dict[str, Any]
) -> tuple[dict[Path, set[str] | None] | None, str, str]:
    """What `cons` reads of its input body: {path: accepted types or None}, the source's
    name for messages, or None and why nothing is known."""
    if cons.mapping is not None:
        paths = mapping_paths(cons.mapping)
        if paths is None:
            return None, "", "its mapping cannot be read"
        return {p: None for p in paths}, f"{cons.id}'s mapping", ""
    schema, why = schema_of(cfunc, "in")
    if schema is None:
        return None, "", why
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    needs: dict[Path, set[str] | None] = {}
    for fname in sorted(_required(schema)):
        needs[(fname,)] = _types((props or {}).get(fname))
    return needs, f"{cons.id}'s metadata.in", ""


def _required(schema: dict[str, Any]) -> set[str]:
    out = {r for r in schema.get("required") or [] if isinstance(r, str)}
    props = schema.get("properties")
    if isinstance(props, dict):
        out |= {k for k, v in props.items() if isinstance(v, dict) and v.get("required") is True}
    return out


def _types(schema: Any) -> set[str] | None:
    """The JSON types a schema allows (None: any, or not said)."""
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    if isinstance(t, str) and t in _TYPES:
        return {t}
    if isinstance(t, list) and t and all(isinstance(x, str) and x in _TYPES for x in t):
        return set(t)
    return None


def _fits(given: set[str], accepted: set[str]) -> bool:
    """Whether every type in `given` is one `accepted` takes (an integer is a number)."""
    return all(t in accepted or (t == "integer" and "number" in accepted) for t in given)


def _missing(
    out: dict[str, Any], needs: dict[Path, set[str] | None]
) -> dict[tuple[Path, str], tuple[str, str]]:
    """Needs `out` does not meet: (path, "missing") or (path, "type") → (given, accepted)."""
    found: dict[tuple[Path, str], tuple[str, str]] = {}
    for path, accepted in needs.items():
        node: Any = out
        for i, part in enumerate(path):
            props = node.get("properties") if isinstance(node, dict) else None
            if not isinstance(props, dict):
                node = None  # not said how deep it goes: unknown, not missing
                break
            if part not in props:
                found[(path[: i + 1], "missing")] = ("", "")
                node = None
                break
            node = props[part]
        if node is None or accepted is None:
            continue
        given = _types(node)
        if given is not None and not _fits(given, accepted):
            found[(path, "type")] = (_show(given), _show(accepted))
    return found


def _show(types: set[str]) -> str:
    return " or ".join(sorted(types))


def _old_out(
    prod: model.Step, old: dict[str, model.Step], descriptors: Descriptors
) -> dict[str, Any] | None:
    was = old.get(prod.id)
    if was is None:
        return None
    schema, _why = schema_of(function_of(_desc(descriptors, was), was), "out")
    return schema


def _old_missing(
    prod: model.Step, cons: model.Step, old: dict[str, model.Step], descriptors: Descriptors
) -> dict[tuple[Path, str], tuple[str, str]]:
    """What the same check finds on the versions that run now (empty: nothing known)."""
    oprod, ocons = old.get(prod.id), old.get(cons.id)
    if oprod is None or ocons is None:
        return {}
    out = _old_out(prod, old, descriptors)
    cfunc = function_of(_desc(descriptors, ocons), ocons)
    if out is None or cfunc is None:
        return {}
    needs, _source, _why = _needs(ocons, cfunc)
    return {} if needs is None else _missing(out, needs)


def _kind(step: model.Step) -> str:
    return "trigger" if step.kind == "trigger" else "action"


# -- the fields a JSONata mapping reads ------------------------------------------------------


def mapping_paths(expr: str) -> set[Path] | None:
    """The field paths of the input body that mapping `expr` reads (`text`, `a.b`), found in
    its syntax tree; None when it does not compile.

    Conservative: only paths that start at the input's root as plain names are taken — the
    operands of operators, function arguments, object and array constructors, conditions and
    blocks. Names inside filters (`items[price > 3]`), sort terms, lambdas, after a variable
    (`$x.a`, `$$.a`, `$getPassthrough().tick`), in `~>`'s right side and in transforms are
    relative to something else and are left out; so are wildcards and descendants (`*`,
    `**`). A path stops at its first step that is not a plain name, and a name with a filter
    ends it (`items[0].sku` reads `items`). A mapping may read more than this finds, never
    less than it says.
    """
    try:
        ast = compile_mapping(expr).ast
    except ValueError:
        return None
    found: set[Path] = set()
    for path in _walk(ast, at_root=True):
        found.add(path)
    return found


def _walk(node: Any, at_root: bool) -> Iterator[Path]:
    if node is None or not hasattr(node, "type"):
        return
    kind = node.type
    if kind == "path":
        steps = list(getattr(node, "steps", None) or [])
        names: list[str] = []
        if at_root:
            for st in steps:
                if st.type != "name" or getattr(st, "group", None) is not None:
                    break
                names.append(str(st.value))
                if getattr(st, "stages", None) or getattr(st, "predicate", None):
                    break
        if names:
            yield tuple(names)
        return  # what follows is relative to the path's own steps
    if kind == "name":  # a bare name (not wrapped in a path)
        if at_root:
            yield (str(node.value),)
        return
    children: list[Any] = []
    if kind == "binary":
        # a filter or a group-by is relative to its left side
        children = [node.lhs] if node.value in ("[", "{") else [node.lhs, node.rhs]
    elif kind == "unary":
        if node.value == "{":
            for pair in getattr(node, "lhs_object", None) or []:
                children.extend(pair)
        elif node.value == "[":
            children = list(getattr(node, "expressions", None) or [])
        else:
            children = [getattr(node, "expression", None)]
    elif kind in ("function", "partial"):
        children = list(getattr(node, "arguments", None) or [])
    elif kind == "condition":
        children = [node.condition, node.then, getattr(node, "_else", None)]
    elif kind == "block":
        children = list(getattr(node, "expressions", None) or [])
    elif kind == "bind":
        children = [node.rhs]
    elif kind == "apply":
        children = [node.lhs]
    # anything else (lambda, sort, transform, regex, variables, literals) adds nothing
    for child in children:
        yield from _walk(child, at_root)


# -- validate_input ---------------------------------------------------------------------------


def input_schema(func: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `metadata.in` a `validate_input` step checks its messages against (None: none)."""
    found, _why = schema_of(func, "in")
    return found


def input_problems(steps: Sequence[model.Step], descriptors: Descriptors) -> list[str]:
    """Steps with `validate_input = true` whose function has no usable static metadata.in."""
    out = []
    for step in steps:
        if not step.validate_input or step.version is None:
            continue
        if step.kind == "trigger":
            out.append(
                f"step {step.id}: validate_input = true is for action steps (a trigger has no "
                "input messages); remove it"
            )
            continue
        func = function_of(_desc(descriptors, step), step)
        if func is None:
            continue
        found, why = schema_of(func, "in")
        if found is None:
            out.append(
                f"step {step.id}: validate_input = true, but {step.component} v{step.version} "
                f'{_kind(step)} "{step.function}" cannot be checked: {why}; remove '
                "validate_input or declare metadata.in in component.json"
            )
    return out
