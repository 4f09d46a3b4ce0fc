"""What the soak runs: the two components' code (counting triggers, relay, idempotent sink
that fails a known subset), each kind of push as files to commit, and the flow files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TICKER = """\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0) + 1
    ctx.emit("snapshot", {"n": n})
    return {"n": n}
"""
# The fast trigger: BURST messages per call, as fast as its interval (and backpressure) allow.
BURST = 5
BURSTY = f"""\
def process(msg, cfg, snapshot, ctx):
    n = snapshot.get("n", 0)
    ctx.emit("snapshot", {{"n": n + {BURST}}})
    return [{{"n": n + i}} for i in range(1, {BURST + 1})]
"""
# Every sink version fails these messages (an exception in process()): each must end up a
# dead letter exactly once, never handled, never lost.
FAIL_EVERY = 7
RELAY = """\
TAG = {tag!r}

def process(msg, cfg):
    return dict(msg["body"])
"""
# Idempotent by message id, across processes: the check and the append happen under an
# exclusive lock on the out file, after reading what other processes (an old version still
# finishing, a killed predecessor) appended since this process last looked.
SINK = """\
import fcntl, json, os, time
TAG = {tag!r}
{extra}
_seen = set()
_offset = 0


def init(cfg):
    time.sleep(0.25)  # a slow warm-up, as real components have: publishes take a while


def _catch_up(fh):
    global _offset
    fh.seek(_offset)
    data = fh.read()
    end = data.rfind(b"\\n") + 1
    for line in data[:end].splitlines():
        if line.strip():
            _seen.add(json.loads(line)["id"])
    _offset += end


def process(msg, cfg):
    if msg["body"]["n"] % {fail_every} == 0:
        raise ValueError(f"soak: n {{msg['body']['n']}} always fails")
    if cfg.get("delay"):
        time.sleep(float(cfg["delay"]))
    with open(cfg["out"], "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _catch_up(fh)
        if msg["id"] in _seen:  # a redelivery after a kill: the effect already happened
            with open(cfg["out"] + ".redelivered", "a") as dup:
                dup.write(json.dumps({{"id": msg["id"], "n": msg["body"]["n"], "by": TAG}}) + "\\n")
            return None
        line = {{"id": msg["id"], "n": msg["body"]["n"], "flow": msg["body"]["flow"], "by": TAG}}
        fh.write((json.dumps(line) + "\\n").encode())
        fh.flush()
        os.fsync(fh.fileno())
        _offset = fh.tell()
        _seen.add(msg["id"])
    return None
"""

PUSH_KINDS = ["good", "build_fail", "test_fail", "import_error", "removed_action"]


def descriptor(kind: str) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "title": "Soak",
        "runtime": "python",
        "triggers": {"ticker": {"main": "./lib/ticker.py"}, "burst": {"main": "./lib/burst.py"}},
        "actions": {
            "relay": {"main": "./lib/relay.py"},
            "sink": {"main": "./lib/sink.py", "fields": {"out": {"required": True}}},
        },
    }
    if kind == "build_fail":
        desc["build"] = "echo 'soak: the build is broken' >&2; exit 3"
    elif kind == "test_fail":
        desc["test"] = "echo 'soak: 1 test failed' >&2; exit 1"
    elif kind == "removed_action":
        del desc["actions"]["sink"]
    return desc


def files_for(kind: str, tag: str) -> dict[str, Any]:
    extra = 'raise RuntimeError("soak: broken at import")' if kind == "import_error" else ""
    return {
        "component.json": descriptor(kind),
        "lib/ticker.py": TICKER,
        "lib/burst.py": BURSTY,
        "lib/relay.py": RELAY.format(tag=tag),
        "lib/sink.py": SINK.format(tag=tag, extra=extra, fail_every=FAIL_EVERY),
    }


def flow_text(
    name: str,
    comp: str,
    out: Path,
    interval: str,
    relay: bool,
    max_queue: int | None = None,
    delay: float | None = None,
) -> str:
    """ticker (or, with `max_queue`, the burst trigger) → [relay] → (mapper) sink; the sink's
    queue limited to `max_queue`, each of its messages taking `delay` seconds."""
    trigger = "burst" if max_queue is not None else "ticker"
    steps = [
        f'[[steps]]\nid = "tick"\ncomponent = "{comp}"\nfunction = "{trigger}"\n'
        f'interval = "{interval}"\n'
    ]
    if relay:
        steps.append(f'[[steps]]\nid = "relay"\ncomponent = "{comp}"\nfunction = "relay"\n')
    config = f'out = "{out}"' + (f', delay = "{delay}"' if delay else "")
    steps.append(
        f'[[steps]]\nid = "sink"\ncomponent = "{comp}"\nfunction = "sink"\n'
        f'mapping = \'{{"n": n, "flow": "{name}"}}\'\n'
        + (f"max_queue = {max_queue}\n" if max_queue is not None else "")
        + f"config = {{ {config} }}\n"
    )
    return f'name = "{name}"\ntype = "realtime"\nupdate = "auto"\n' + "".join(steps)
