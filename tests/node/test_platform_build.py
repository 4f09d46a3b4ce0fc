"""Node components build as on the platform (issue 17), end to end with real pushes and npm.

Offline and reproducible: dependencies are tiny local `file:` packages inside the component,
and "a lock file `npm ci` refuses" is one out of sync with package.json (as the XML
component's lock file is for npm 11), so no registry is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, Work, db_rows, wait_until
from tests.flows.conftest import flow_toml, read_out

# The action requires `tiny` (a dependency) at run time; `npm test` requires `devtool` (a dev
# dependency), which must be installed for the tests and gone from the artifact.
ACTION_JS = """\
'use strict';
const fs = require('fs');
const tiny = require('tiny');
exports.process = async function (msg, cfg) {
  const body = { n: msg.body.n, tiny: tiny.answer };
  if (cfg.out) fs.appendFileSync(cfg.out, JSON.stringify(body) + '\\n');
  return { body };
};
"""
TICK_JS = """\
'use strict';
exports.process = async function (msg, cfg, snapshot) {
  const n = (snapshot.n || 0) + 1;
  this.emit('snapshot', { n });
  return { body: { n } };
};
"""
TEST_JS = """\
'use strict';
const devtool = require('devtool');
require('../lib/act.js');
console.log('tests ran with ' + devtool.name);
if (process.env.FAIL_MARK || require('fs').existsSync('FAIL')) {
  console.error('expected 2 rows, got 3 (the failing assertion)');
  process.exit(1);
}
"""


def node_component(
    *,
    engines: str = ">=18",
    lock_in_sync: bool = False,
    version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A node component with a dependency and a dev dependency (local `file:` packages)."""
    desc: dict[str, Any] = {
        "title": "Built like the platform",
        "triggers": {"tick": {"main": "./lib/tick.js"}},
        "actions": {"act": {"main": "./lib/act.js"}},
    }
    if version:
        desc["version"] = version
    pkg = {
        "name": "platform-build",
        "version": "1.0.0",
        "scripts": {"test": "node test/test.js"},
        "engines": {"node": engines},
        "dependencies": {"tiny": "file:vendor/tiny"},
        "devDependencies": {"devtool": "file:vendor/devtool"},
    }
    root: dict[str, Any] = {"name": "platform-build", "version": "1.0.0"}
    lock: dict[str, Any] = {
        "name": "platform-build",
        "version": "1.0.0",
        "lockfileVersion": 3,
        "requires": True,
        "packages": {"": root},  # out of sync: neither dependency is in it
    }
    if lock_in_sync:
        root.update(
            dependencies=pkg["dependencies"],
            devDependencies=pkg["devDependencies"],
            engines=pkg["engines"],
        )
        lock["packages"].update(
            {
                "node_modules/devtool": {"resolved": "vendor/devtool", "link": True},
                "node_modules/tiny": {"resolved": "vendor/tiny", "link": True},
                "vendor/devtool": {"version": "1.0.0", "dev": True},
                "vendor/tiny": {"version": "1.0.0"},
            }
        )
    files: dict[str, Any] = {
        "component.json": desc,
        "package.json": pkg,
        "package-lock.json": lock,
        "lib/act.js": ACTION_JS,
        "lib/tick.js": TICK_JS,
        "test/test.js": TEST_JS,
        "vendor/tiny/package.json": {"name": "tiny", "version": "1.0.0", "main": "index.js"},
        "vendor/tiny/index.js": "module.exports = { answer: 42 };\n",
        "vendor/devtool/package.json": {"name": "devtool", "version": "1.0.0", "main": "i.js"},
        "vendor/devtool/i.js": "module.exports = { name: 'devtool' };\n",
        ".gitignore": "node_modules/\n",
    }
    files.update(extra or {})
    return files


def build_log(daemon: Daemon, build: dict[str, Any]) -> str:
    return daemon.cli("build-log", str(build["id"])).stdout


def artifact(daemon: Daemon, name: str, version: int) -> Path:
    rows = db_rows(
        daemon.state_dir,
        "SELECT artifact_dir FROM versions WHERE component = ? AND version = ?",
        name,
        version,
    )
    return Path(rows[0]["artifact_dir"])


def versions(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return list(json.loads(daemon.cli("versions", name, "--json").stdout))


def test_refused_lock_file_builds_through_npm_install_tests_and_prunes_dev_dependencies(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work], tmp_path: Path
) -> None:
    work = component("xmlish")
    sha = work.commit("a lock file npm ci refuses", node_component(engines=">=99"))
    daemon = daemon_factory([{"name": "xmlish"}]).start()
    work.remote = daemon.hosted("xmlish")
    work.push()
    build = daemon.wait_build("xmlish", sha, timeout=120)
    log = build_log(daemon, build)
    assert build["status"] == "succeeded", (build["error"], log)
    # npm ci first; its refusal and the fallback are said in the log, with npm's reason
    assert "$ npm ci --include=dev" in log
    assert "[deployd: npm ci refused the lock file (" in log and "Missing: tiny@" in log
    assert "installing with `npm install` instead]" in log
    assert log.index("$ npm ci") < log.index("$ npm install") < log.index("$ npm test")
    # npm test ran with the dev dependency installed, then the dev dependencies were pruned
    assert "tests ran with devtool" in log
    assert log.index("$ npm test") < log.index("$ npm prune --omit=dev")
    tree = artifact(daemon, "xmlish", 1)
    assert (tree / "node_modules" / "tiny").exists()
    assert not (tree / "node_modules" / "devtool").exists()
    # engines.node >=99 is not satisfied by the node in use: a warning, not a failure
    node = daemon.status()["runtimes"]["node"]
    assert (
        f"[deployd: warning: package.json engines.node '>=99' is not satisfied by node {node}"
        in log
    )
    [row] = versions(daemon, "xmlish")
    assert row["version"] == 1 and row["recent"] is True
    assert (
        len(row["warnings"]) == 1 and "engines.node '>=99' is not satisfied" in row["warnings"][0]
    )
    plain = daemon.cli("versions", "xmlish").stdout
    assert "warning:" in plain and "engines.node" in plain
    # the artifact runs: the action requires its (non-dev) dependency
    out = tmp_path / "out.jsonl"
    flow = tmp_path / "xml.toml"
    steps = [
        {"id": "tick", "component": "xmlish", "function": "tick", "interval": "50ms"},
        {"id": "act", "component": "xmlish", "function": "act", "config": {"out": out}},
    ]
    flow.write_text(flow_toml("xml", out, steps=steps))
    daemon.cli("flow", "apply", str(flow))
    rows = wait_until(lambda: (r := read_out(out)) and len(r) >= 2 and r, timeout=60)
    assert rows[:2] == [{"n": 1, "tiny": 42}, {"n": 2, "tiny": 42}]
    daemon.cli("flow", "stop", "xml")
    # a lock file in step with package.json: npm ci, no fallback, no warning
    sha2 = work.commit_push("lock in sync", node_component(lock_in_sync=True))
    build = daemon.wait_build("xmlish", sha2, timeout=120)
    log = build_log(daemon, build)
    assert build["status"] == "succeeded", (build["error"], log)
    assert "$ npm ci --include=dev" in log and "refused" not in log and "$ npm install" not in log
    assert "tests ran with devtool" in log and "[deployd: warning" not in log
    assert versions(daemon, "xmlish")[0]["warnings"] == []
    assert not (artifact(daemon, "xmlish", 2) / "node_modules" / "devtool").exists()


def test_failing_npm_test_fails_the_build_and_node_test_false_skips_it(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    work = component("tested")
    sha = work.commit("a failing test", node_component(lock_in_sync=True, extra={"FAIL": "x\n"}))
    strict = daemon_factory([{"name": "tested"}]).start()
    work.push(strict.hosted("tested"))
    build = strict.wait_build("tested", sha, timeout=120)
    assert build["status"] == "failed"
    assert "test command `npm test` exited with code 1" in build["error"]
    assert "expected 2 rows, got 3" in build["error"]  # the test's own output
    log = build_log(strict, build)
    assert "tests ran with devtool" in log and "expected 2 rows, got 3" in log
    assert "$ npm prune" not in log
    assert strict.component_status("tested")["recent"] is None
    strict.stop()
    # daemon.node_test = false: the same commit builds, npm test is not run (and said so)
    lenient = daemon_factory([{"name": "tested"}], node_test=False).start()
    work.push(lenient.hosted("tested"))
    build = lenient.wait_build("tested", sha, timeout=120)
    log = build_log(lenient, build)
    assert build["status"] == "succeeded", (build["error"], log)
    assert "[deployd: daemon.node_test is false: `npm test` not run]" in log
    assert "$ npm test" not in log and "tests ran" not in log
    assert "$ npm prune --omit=dev" in log
    assert not (artifact(lenient, "tested", 1) / "node_modules" / "devtool").exists()


def test_failed_install_names_npms_reason_not_its_usage(
    daemon_factory: Callable[..., Daemon], component: Callable[..., Work]
) -> None:
    daemon = daemon_factory([{"name": "locked"}, {"name": "unlocked"}]).start()
    missing = "file:vendor/gone-1.0.0.tgz"
    for name, lock in (("locked", True), ("unlocked", False)):
        work = component(name)
        files = node_component()
        files["package.json"]["dependencies"]["gone"] = missing
        if not lock:
            del files["package-lock.json"]
        sha = work.commit("a dependency that is not there", files)
        work.push(daemon.hosted(name))
        build = daemon.wait_build(name, sha, timeout=120)
        assert build["status"] == "failed", name
        error = build["error"]
        # npm's reason, on one line, with the path inside the component
        verb = "ci" if lock else "install"
        assert error.startswith(f"`npm {verb}` failed (exit code "), error
        assert "ENOENT" in error and "open 'vendor/gone-1.0.0.tgz'" in error, error
        assert "Usage" not in error and "--install-strategy" not in error and "\n" not in error
        assert "complete log" not in error and "builds/" not in error, error
        if not lock:
            log = build_log(daemon, build)
            assert "[deployd: no package-lock.json: installing with `npm install`]" in log
