"""Finding node (missing, too old, fine), refusing node components without it, the idle pool."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from deployd.toolchains import node as noderuntime
from tests.conftest import Daemon, Work, wait_until
from tests.node.conftest import NodeEnv, platform_files


def fake_node(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"node-{version}"
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def test_detect_names_missing_too_old_and_good_node(tmp_path: Path) -> None:
    missing = noderuntime.detect("/nonexistent/node")
    assert missing.error is not None and not missing.ok
    assert missing.error.startswith("node not found: /nonexistent/node does not exist")
    assert "Node.js 18 or newer" in missing.error
    not_on_path = noderuntime.detect("no-such-node-binary")
    assert not_on_path.error is not None and "no 'no-such-node-binary' on PATH" in not_on_path.error
    old = noderuntime.detect(str(fake_node(tmp_path, "v16.20.2")))
    assert old.version == "v16.20.2" and old.error is not None
    assert "node v16.20.2 at" in old.error and "is too old" in old.error
    good = noderuntime.detect(str(fake_node(tmp_path, "v18.0.0")))
    assert good.ok and good.version == "v18.0.0"
    real = noderuntime.detect("node")
    assert real.ok and real.path and real.version and real.version.startswith("v")


def test_missing_node_is_refused_with_a_clear_error(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> None:
    work = component("platform")
    work.commit("platform-style component", platform_files())
    d = daemon_factory([{"name": "platform"}]).start()
    sha = work.push(d.hosted("platform"))
    d.wait_recent("platform", sha, timeout=40)  # built with the real node
    assert d.status()["runtimes"]["node"] == noderuntime.detect("node").version
    d.stop()

    d.daemon_extra["node"] = "/nonexistent/node"
    d.write_config()
    check = d.cli("check-config").stdout
    assert "node       node not found: /nonexistent/node does not exist (daemon.node)" in check
    d.start()
    status = d.status()
    assert status["runtimes"]["node"] is None and status["runtimes"]["python"]
    assert "node not available" in d.cli("status").stdout
    flow = tmp_path / "f.toml"
    flow.write_text(
        'name = "f"\n[[steps]]\nid = "t"\ncomponent = "platform"\nfunction = "counter"\n'
        f'[[steps]]\nid = "w"\ncomponent = "platform"\nfunction = "write"\n'
        f'config = {{ out = "{tmp_path / "out.jsonl"}" }}\n'
    )
    refused = d.cli("flow", "apply", str(flow), check=False)
    assert refused.returncode != 0
    assert (
        "step t: platform v1 cannot run: node not found: /nonexistent/node does not exist"
        in refused.stderr
    ), refused.stderr
    # A new push of a node component fails its build with the same reason.
    work.commit("again")
    sha2 = work.push(d.hosted("platform"))
    build = d.wait_build("platform", sha2, timeout=30)
    assert build["status"] == "failed"
    assert build["error"].startswith("node not found: /nonexistent/node does not exist")


def _pool_sailors(daemon_pid: int) -> list[int]:
    """pids of the idle/pooled Node sailors of the daemon `daemon_pid`.

    A pooled sailor is a `node sailor.js --pool` whose environment names that daemon's
    socket (the spec is never on the command line, where any user could read the token).
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(cmd) >= 3 and cmd[1].endswith(b"sailor.js") and cmd[2] == b"--pool":
            assert not any(b"token" in part for part in cmd), "a token on the command line"
            marker = f"deployd-{daemon_pid}-".encode()
            if any(v.startswith(b"DEPLOYD_SPEC=") and marker in v for v in env):
                pids.append(int(entry))
    return pids


def test_pool_sailors_serve_steps_and_exit_with_the_daemon(
    node_env: Callable[..., NodeEnv],
) -> None:
    env = node_env()
    assert env.daemon.proc is not None
    daemon_pid = env.daemon.proc.pid
    idle = wait_until(lambda: _pool_sailors(daemon_pid), timeout=30)
    out = env.out("pooled")
    env.apply(
        "pooled",
        [
            {"id": "tick", "component": "platform", "function": "counter", "interval": "50ms"},
            {
                "id": "write",
                "component": "platform",
                "function": "write",
                "config": {"out": str(out)},
            },
        ],
    )
    env.wait_rows(out, lambda r: len(r) >= 2)
    pids = {s["pid"] for s in env.flow("pooled")["steps"]}
    assert set(idle) & pids, "no step took a pre-started sailor"
    # the pool is topped up to the flow's node step count
    wait_until(lambda: len(set(_pool_sailors(daemon_pid)) - pids) >= 2, timeout=30)
    env.daemon.stop(signal.SIGKILL)
    # the daemon's socket is gone: every sailor, idle or serving a step, exits by itself
    wait_until(lambda: not _pool_sailors(daemon_pid), timeout=30)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=30)
