"""Dynamic metadata: a component version's service verbs, and the check that uses them.

On the platform a function that declares `"dynamicMetadata": true` says what input it needs
through `getMetaModel(cfg)` (`{in, out}` JSON schemas), and a field with `"model": "method"`
gets its choices from that method (`{value: label}`). `Metadata.call` runs one of those verbs
of a registered version in a one-off step process (the runtime's `call_method`), for
`deployd component call` and its HTTP route. `Metadata.problems` is the part of flow
validation that uses them: the required input fields of a dynamic step's `in` schema must be
provided by its mapping or, without one, by the previous step's output schema. Results are
cached per (component version, function, cfg hash), so a publish does not start a process
every time; failures are not cached.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import FlowError
from ..runtime.base import VERIFY, MethodCall, MethodFailed, Runtime
from ..runtime.credentials import Credentials
from ..runtime.mapper import compile_mapping
from ..store import Row, Store
from . import model, secrets

GET_META_MODEL = "getMetaModel"
SELECT_MODEL = "selectModel"
DEFAULT_TIMEOUT = 30.0  # seconds a call may take, its process's start included
MAX_TIMEOUT = 300.0
VALIDATE_TIMEOUT = 30.0  # for getMetaModel during flow validation
CACHE_SIZE = 256


class CallError(FlowError):
    """A service verb cannot be called or did not answer; `status` is the HTTP status (404
    unknown component/version, 422 bad function/method/cfg, 502 it failed, 504 timeout)."""

    exit_code = 1

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class Metadata:
    """Service verbs of registered component versions, with a cache of their answers."""

    def __init__(
        self,
        config: Config,
        store: Store,
        runtime: Runtime,
        credentials: Credentials | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.credentials = credentials or Credentials(config, store)
        self._cache: collections.OrderedDict[tuple[str, int, str, str, str], Any] = (
            collections.OrderedDict()
        )

    # -- deployd component call --------------------------------------------------------------

    async def call(
        self,
        component: str,
        method: str,
        function: str,
        cfg: dict[str, Any],
        version: int | None = None,
        field: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        credential: str | None = None,
    ) -> dict[str, Any]:
        """Run `method` of `function` of `component` (v`version`, default the recent one)
        with `cfg` (its `${VAR}` expanded from deployd's environment, `credential` merged in
        as for a step); what it returned."""
        if not 0 < timeout <= MAX_TIMEOUT:
            raise CallError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds", 422)
        row = self._version(component, version)
        kind, func = _function(row, function)
        name = _method(row, function, func, method, field)
        expanded = _expand(cfg, "cfg", self.config)
        if credential is not None:
            cred = self.credentials.definition(credential)
            if cred is None:
                raise CallError(self.credentials.unknown(credential), 404)
            if cred.component != component:
                raise CallError(
                    f"credential {credential!r} belongs to component {cred.component!r}, not "
                    f"{component!r}",
                    422,
                )
            expanded, _warning = self.credentials.cfg(credential, component, expanded)
        call = _call(row, kind, function, func, name, expanded, credential)
        result = await self._run(call, timeout)
        return {
            "component": component,
            "version": row["version"],
            "function": function,
            "method": name,
            "result": result,
        }

    # -- deployd credential verify -----------------------------------------------------------

    async def verify(
        self, name: str, version: int | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Run `verifyCredentials(cfg)` of credential `name`'s component (v`version`, default
        the recent one) with the credential's fields as cfg, in a one-off step process.

        `verified` is True or False (then `reason` says why: what the verifier said, or the
        required field the credential lacks), or None when the version has no verifier
        (nothing was checked). CallError when it could not run at all."""
        if not 0 < timeout <= MAX_TIMEOUT:
            raise CallError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds", 422)
        cred = self.credentials.definition(name)
        if cred is None:
            raise CallError(self.credentials.unknown(name), 404)
        row = self._version(cred.component, version)
        ref = f"{cred.component} v{row['version']}"
        out: dict[str, Any] = {
            "credential": name,
            "component": cred.component,
            "version": row["version"],
            "verifier": None,
        }
        declared = row["descriptor"].get("credentials")
        if not isinstance(declared, dict):
            return {
                **out,
                "verified": None,
                "reason": f"{ref} takes no credential: its component.json has no credentials "
                "section, so there is nothing to verify",
            }
        main, missing = verifier_of(row)
        if main is None:
            return {**out, "verified": None, "reason": missing}
        out["verifier"] = main
        fields, _warning = self.credentials.fields(name)
        wanted = declared.get("fields")
        for fname, fspec in (wanted if isinstance(wanted, dict) else {}).items():
            if isinstance(fspec, dict) and fspec.get("required") is True and fname not in fields:
                return {
                    **out,
                    "verified": False,
                    "reason": f"field {fname!r} is required by {ref} (component.json "
                    f"credentials.fields) but credential {name} has no value for it",
                }
        cfg, _warning = self.credentials.cfg(name, cred.component, {})
        call = MethodCall(
            component=cred.component,
            version=int(row["version"]),
            function=VERIFY,
            kind="credentials",
            method=VERIFY,
            artifact_dir=row["artifact_dir"],
            main=main,
            runtime=row["descriptor"].get("runtime") or row["runtime"],
            cfg=cfg,
            credential=name,
        )
        result = await self._run(call, timeout)
        verified, reason = verify_result(result)
        return {**out, "verified": verified, **({"reason": reason} if reason else {})}

    def _version(self, component: str, version: int | None) -> Row:
        if self.config.component(component) is None:
            known = ", ".join(c.name for c in self.config.components) or "none configured"
            raise CallError(f"unknown component {component!r} (known: {known})", 404)
        row = (
            self.store.recent(component)
            if version is None
            else self.store.version(component, version)
        )
        if row is None:
            what = "has no version yet (push it)" if version is None else f"has no v{version}"
            raise CallError(f"{component} {what} (see `deployd versions {component}`)", 404)
        if not row["artifact_dir"]:
            raise CallError(
                f"the code of {component} v{row['version']} was removed by retention "
                "(use a newer version, or raise daemon.keep_versions)",
                404,
            )
        return row

    async def _run(self, call: MethodCall, timeout: float) -> Any:
        try:
            return await self.runtime.call_method(call, timeout)
        except MethodFailed as exc:
            raise CallError(str(exc), 504 if exc.timed_out else 502) from exc

    # -- flow validation ---------------------------------------------------------------------

    async def meta_model(self, step: model.Step, row: Row, cache: bool = True) -> Any:
        """getMetaModel(step.config) of `step`'s version, from the cache when known
        (`cache` False: a tree that is not a registered version, asked and not kept)."""
        cfg_hash = hashlib.sha256(
            json.dumps([step.config, step.credential], sort_keys=True, default=str).encode()
        ).hexdigest()
        key = (step.component, int(row["version"]), step.function, GET_META_MODEL, cfg_hash)
        if cache and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        kind, func = _function(row, step.function)
        cfg = dict(step.config)
        if step.credential is not None:  # as the step will get it (a bad one: validation's)
            cfg, _warning = self.credentials.cfg(step.credential, step.component, cfg)
        call = _call(row, kind, step.function, func, GET_META_MODEL, cfg, step.credential)
        result = await self._run(call, VALIDATE_TIMEOUT)
        if not cache:
            return result
        self._cache[key] = result
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    async def problems(
        self,
        steps: list[model.Step],
        skip: set[str] | frozenset[str] = frozenset(),
        rows: dict[tuple[str, int], Row] | None = None,
    ) -> list[str]:
        """Why the dynamic metadata of `steps` says they cannot run, as `step ID: what` lines.

        Only functions with `"dynamicMetadata": true` are asked; a failed or malformed
        getMetaModel is a problem (the draft is not published blind). Steps the static checks
        already refuse (no such version or function, or the ids in `skip`) are left to those.
        `rows`: versions that are not registered (a plan's trial build), by (component,
        version); their answers are not cached.
        """
        unregistered = rows or {}
        out: list[str] = []
        known: dict[tuple[str, int], Row | None] = {}
        metas: dict[str, Any] = {}  # step id -> its getMetaModel result, or an Exception

        def row_of(step: model.Step) -> Row | None:
            if step.version is None:
                return None
            key = (step.component, step.version)
            if key in unregistered:
                return unregistered[key]
            if key not in known:
                known[key] = self.store.version(*key)
            return known[key]

        async def meta(step: model.Step) -> Any:
            if step.id not in metas:
                row = row_of(step)
                assert row is not None
                key = (step.component, int(row["version"]))
                try:
                    metas[step.id] = await self.meta_model(step, row, key not in unregistered)
                except CallError as exc:
                    metas[step.id] = exc
            return metas[step.id]

        for i, step in enumerate(steps):
            row = row_of(step)
            if i == 0 or step.id in skip or row is None or not _dynamic(row, step):
                continue
            ref = f"{step.component} v{step.version}"
            result = await meta(step)
            if isinstance(result, CallError):
                out.append(f"step {step.id}: the dynamic metadata of {ref} is unknown: {result}")
                continue
            if not isinstance(result, dict) or not isinstance(result.get("in", {}), dict):
                out.append(
                    f"step {step.id}: getMetaModel of {ref} {step.function} returned "
                    f"{_kind(result)}, not an object {{in, out}} of JSON schemas"
                )
                continue
            required = required_fields(result.get("in") or {})
            if not required:
                continue
            if step.mapping is not None:
                provided, source = mapping_keys(step.mapping), "its mapping"
            else:
                prev = steps[i - 1]
                source = f"step {prev.id} ({prev.component} {prev.function})"
                provided = await self._provides(prev, row_of(prev), meta)
                if isinstance(provided, CallError):
                    out.append(f"step {step.id}: what {source} provides is unknown: {provided}")
                    continue
            if provided is None:
                continue  # not known statically (a computed mapping, no out schema)
            for name in sorted(required - provided):
                out.append(
                    f"step {step.id}: input field {name!r} is required by the dynamic metadata "
                    f"of {ref} {step.function} (getMetaModel) but {source} does not provide it;"
                    " map it in the step's mapping"
                )
        return out

    async def _provides(self, prev: model.Step, row: Row | None, meta: Any) -> Any:
        """The body fields `prev` emits (its `out` schema's properties): a set, None when
        unknown, or the CallError of its own getMetaModel."""
        if row is None:
            return None
        if _dynamic(row, prev):
            result = await meta(prev)
            if isinstance(result, CallError):
                return result
            out = result.get("out") if isinstance(result, dict) else None
        else:
            func = _function_or_none(row, prev.function)
            out = ((func or {}).get("metadata") or {}).get("out")
        props = out.get("properties") if isinstance(out, dict) else None
        return set(props) if isinstance(props, dict) else None


def required_fields(schema: Any) -> set[str]:
    """The required properties of a JSON schema: its `required` list, and (the platform's
    own style) properties marked `"required": true`."""
    if not isinstance(schema, dict):
        return set()
    out = {r for r in schema.get("required") or [] if isinstance(r, str)}
    props = schema.get("properties")
    if isinstance(props, dict):
        out |= {k for k, v in props.items() if isinstance(v, dict) and v.get("required") is True}
    return out


def mapping_keys(expr: str) -> set[str] | None:
    """The keys a mapping's result has when it is an object constructor (`{"a": …}`);
    None when that cannot be known without evaluating it."""
    try:
        ast = compile_mapping(expr).ast
    except ValueError:
        return None
    if getattr(ast, "type", None) != "unary" or getattr(ast, "value", None) != "{":
        return None
    keys = set()
    for pair in getattr(ast, "lhs_object", None) or []:
        key = pair[0]
        if getattr(key, "type", None) != "string":
            return None  # a computed key
        keys.add(str(key.value))
    return keys


def _dynamic(row: Row, step: model.Step) -> bool:
    func = _function_or_none(row, step.function)
    return bool(func and func.get("dynamicMetadata") is True)


def _function_or_none(row: Row, function: str) -> dict[str, Any] | None:
    desc = row["descriptor"]
    for group in ("triggers", "actions"):
        func = (desc.get(group) or {}).get(function)
        if isinstance(func, dict):
            return func
    return None


def _function(row: Row, function: str) -> tuple[str, dict[str, Any]]:
    desc = row["descriptor"]
    for kind, group in (("trigger", "triggers"), ("action", "actions")):
        func = (desc.get(group) or {}).get(function)
        if isinstance(func, dict):
            return kind, func
    names = [f"{g}: {', '.join(desc.get(g) or {}) or '-'}" for g in ("triggers", "actions")]
    raise CallError(
        f"{row['component']} v{row['version']} has no function {function!r} ("
        + "; ".join(names)
        + ")",
        422,
    )


def model_methods(func: dict[str, Any]) -> dict[str, str]:
    """field name → the `"model"` method of each field of `func` that has one."""
    fields = func.get("fields") or {}
    return {
        name: spec["model"]
        for name, spec in fields.items()
        if isinstance(spec, dict) and isinstance(spec.get("model"), str) and spec["model"]
    }


def _method(row: Row, function: str, func: dict[str, Any], method: str, field: str | None) -> str:
    """The module method to call: getMetaModel, a field's model method (selectModel with
    `field`), or a model method by its own name; only what component.json declares."""
    models = model_methods(func)
    ref = f"{row['component']} v{row['version']} {function}"
    known = ", ".join([GET_META_MODEL, *dict.fromkeys(models.values())])
    if field is not None:
        if method not in (SELECT_MODEL, *models.values()):
            raise CallError(f"--field is only for selectModel (not {method})", 422)
        if field not in models:
            have = ", ".join(models) or "none"
            raise CallError(
                f'field {field!r} of {ref} has no "model" method (fields with one: {have})', 422
            )
        return models[field]
    if method == SELECT_MODEL:
        have = ", ".join(f"{k} ({v})" for k, v in models.items()) or "none"
        raise CallError(
            f"selectModel needs the field whose choices to list: --field NAME "
            f'(fields of {ref} with a "model" method: {have})',
            422,
        )
    if method != GET_META_MODEL and method not in models.values():
        raise CallError(
            f"unknown method {method!r} for {ref} (its methods: {known}; a method is one "
            'named by a field\'s "model" in component.json, or getMetaModel)',
            422,
        )
    return method


def _call(
    row: Row,
    kind: str,
    function: str,
    func: dict[str, Any],
    method: str,
    cfg: dict[str, Any],
    credential: str | None = None,
) -> MethodCall:
    desc = row["descriptor"]
    return MethodCall(
        component=row["component"],
        version=int(row["version"]),
        function=function,
        kind=kind,
        method=method,
        artifact_dir=row["artifact_dir"],
        main=func["main"],
        runtime=desc.get("runtime") or row["runtime"],
        cfg=cfg,
        credential=credential,
    )


def _expand(value: Any, where: str, config: Config) -> Any:
    """`value` with every `${VAR}` in its strings replaced from deployd's environment, by
    the rules of flow files' secrets (`secrets.py`); CallError names the first that fails."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}", config) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", config) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        head, _, key = where.rpartition(".")
        try:
            return secrets.expand({key: value}, head or where, config)[key]
        except FlowError as exc:
            raise CallError(str(exc), 422) from exc
    return value


# Where a component's verifyCredentials lives when component.json does not say: the platform's
# Node sailor requires `<component>/verifyCredentials` (so .js, or a folder's index.js).
DEFAULT_VERIFIERS = {
    "node": ("verifyCredentials.js", "verifyCredentials.cjs", "verifyCredentials/index.js"),
    "python": ("verifyCredentials.py", "verify_credentials.py"),
}
_VERIFIER_SUFFIXES = {"node": (".js", ".cjs", ".mjs"), "python": (".py",)}


def verifier_of(row: Row) -> tuple[str | None, str]:
    """The verifier file of a version (relative to its folder), or None and why there is
    none: component.json `credentials.verifier` when it names a file of this runtime (the
    platform's Java components name a class there), else the default names."""
    desc = row["descriptor"]
    runtime = str(desc.get("runtime") or row["runtime"])
    ref = f"{row['component']} v{row['version']}"
    root = Path(row["artifact_dir"]).resolve()
    declared = desc.get("credentials") or {}
    named = declared.get("verifier") if isinstance(declared, dict) else None
    defaults = DEFAULT_VERIFIERS.get(runtime, ())
    if isinstance(named, str) and named.strip().endswith(_VERIFIER_SUFFIXES.get(runtime, ())):
        candidates: tuple[str, ...] = (named.strip(),)
        missing = (
            f"{ref} has no verifier: component.json credentials.verifier names {named!r}, which "
            "is not a file of this version"
        )
    else:
        candidates = defaults
        missing = (
            f"{ref} has no verifier ({' or '.join(defaults) or 'none for its runtime'} at its "
            "root, or a credentials.verifier file in component.json), so nothing was checked "
            "(the platform then accepts a credential unchecked)"
        )
    for name in candidates:
        try:
            path = (root / name).resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if path.is_relative_to(root) and path.is_file():
            return str(path.relative_to(root)), ""
    return None, missing


def verify_result(result: Any) -> tuple[bool, str | None]:
    """(verified, reason) from what a verifier answered, by the platform's rule: an answer
    without `verified` (a promise of anything, a callback with no result) counts as verified;
    a thrown error is `{verified: false, reason: its message}` (the sailors send that)."""
    if isinstance(result, bool):
        return result, None
    if not isinstance(result, dict) or "verified" not in result:
        return True, None
    verified = result.get("verified") is True
    reason = result.get("reason")
    if verified:
        return True, None
    text = " ".join(str(reason).split()) if reason not in (None, "") else "the verifier said no"
    return False, text[:1000]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )
