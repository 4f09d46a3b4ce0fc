"""The environment a step process gets beyond the clean one: the platform's `ELASTICIO_*`
variables and the step's own `env` table from the flow file.

Shared by every runtime. A pooled step process was started before it knew its step, so these
travel in the step's spec (`"env"`) and the sailor sets them when it becomes the step, before
the component's code is loaded.
"""

from __future__ import annotations

import uuid

from ..objects import flow_token
from ..types import RunStep

# deployd runs realtime flows only; the platform's API calls a realtime flow "long_running".
FLOW_TYPE = "long_running"


def api_uri(listen_host: str, port: int) -> str:
    """deployd's HTTP API as a step on this machine reaches it (a wildcard address: loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def step_environment(
    flow: str, version: int, step: RunStep, api: str | None, object_key: bytes | None = None
) -> dict[str, str]:
    """`ELASTICIO_*` for one start of `step`'s process, then the step's own `env`.

    `ELASTICIO_EXEC_ID` is new for every process start, as the platform's is for every
    container it starts (it is not a per-message id there either). The object storage is
    deployd's API (`api/objects.py`); its token is the flow's (`objects.flow_token`).
    """
    env = {
        "ELASTICIO_FLOW_ID": flow,
        "ELASTICIO_FLOW_VERSION": str(version),
        "ELASTICIO_FLOW_TYPE": FLOW_TYPE,
        "ELASTICIO_STEP_ID": step.id,
        "ELASTICIO_COMP_ID": step.component,
        "ELASTICIO_COMP_NAME": step.component,
        "ELASTICIO_FUNCTION": step.function,
        "ELASTICIO_EXEC_ID": uuid.uuid4().hex,
    }
    if api is not None:
        env["ELASTICIO_API_URI"] = api
        if object_key is not None:
            env["ELASTICIO_OBJECT_STORAGE_URI"] = api
            env["ELASTICIO_OBJECT_STORAGE_TOKEN"] = flow_token(object_key, flow)
    env.update(step.env)  # the flow file refuses ELASTICIO_* names there
    return env
