"""One-off step processes for the platform's service verbs (`getMetaModel`, select models).

The platform runs these, and `verifyCredentials`, in a short-lived container of the component
(its sailor's `runService.js`); here they run in a step process started like any other — the same
launcher, pools, clean environment and protocol — with a spec marked `"service"`, which
loads the function's module without `init()`. One `method` request, one `result`; then the
process is stopped (killed when the method never returned).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

from ..base import VERIFY, MethodCall, MethodFailed, StepFailed
from .process import Launcher, StepDied, StepProcess, log_tail

CALLS_DIR = "_calls"  # under the step logs; no flow is named so (flow names have no '_')


def _spec(call: MethodCall, api: str | None) -> dict[str, Any]:
    env = {
        "ELASTICIO_COMP_ID": call.component,
        "ELASTICIO_COMP_NAME": call.component,
        "ELASTICIO_EXEC_ID": uuid.uuid4().hex,
    }
    if call.kind != "credentials":  # verifyCredentials belongs to no function
        env["ELASTICIO_FUNCTION"] = env["ELASTICIO_ACTION_OR_TRIGGER"] = call.function
    if call.method not in ("getMetaModel", VERIFY):
        env["ELASTICIO_GET_MODEL_METHOD"] = call.method
    if api is not None:
        env["ELASTICIO_API_URI"] = api
    return {
        "flow": "",
        "step": call.method if call.kind == "credentials" else f"{call.function}.{call.method}",
        "kind": call.kind,
        "component": call.component,
        "version": call.version,
        "function": call.function,
        "config": {},  # the cfg travels in the request, never in a process's environment
        "artifact_dir": call.artifact_dir,
        "main": call.main,
        "runtime": call.runtime,
        "env": env,
        "variables": {},
        "service": True,
        "credential": call.credential,
    }


async def call_method(launcher: Launcher, log_dir: Path, call: MethodCall, timeout: float) -> Any:
    """Run `call` in a new step process within `timeout` seconds (start-up included)."""
    what = f"{call.method} of {call.component} v{call.version}" + (
        "" if call.kind == "credentials" else f" {call.function}"
    )
    log_path = log_dir / CALLS_DIR / f"{call.component}.log"
    proc = StepProcess(launcher, _spec(call, launcher.api_uri), log_path)
    answered = False
    try:
        async with asyncio.timeout(timeout):
            await proc.spawn()
            await asyncio.shield(proc.ready)
            res = await proc.request({"t": "method", "name": call.method, "cfg": call.cfg}, None)
        answered = True
    except TimeoutError:
        raise MethodFailed(
            f"{what} did not answer within {timeout:g}s (it neither returned, resolved its "
            "promise nor called its callback); its process was stopped",
            timed_out=True,
            detail=log_tail(log_path),
        ) from None
    except StepFailed as exc:
        raise MethodFailed(f"{what}: {exc.reason}", detail=exc.log_tail) from None
    except StepDied as exc:
        raise MethodFailed(f"{what}: {exc}{log_tail(log_path)}") from None
    finally:
        if proc.ready.done() and not proc.ready.cancelled():
            proc.ready.exception()  # mark retrieved
        if answered:
            await proc.stop(timeout=2)
        elif proc.pid is None:
            launcher.forget(proc)  # a start cut short: a late connection gets nothing, exits
        else:
            proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.exited.wait(), 5)
    if res.errors:
        raise MethodFailed(f"{what} failed: {first_line(res.errors[-1])}", detail=res.detail or "")
    return res.data


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]
