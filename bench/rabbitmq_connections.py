"""Side by side, in one run on one broker: the RabbitMQ runtime's consumers on a connection of
their own (as shipped) or on the publishing connection (as before), and the seed sailor —
paced at RATE msg/s, ROUNDS rounds, the order of the variants reversed every other round.

It is `bench_rabbitmq`'s paced phase (same flow, same windows), with two additions that say
where a message's time goes: `pass` stamps the message (`hops`: emit → pass, pass → sink), and
the daemon notes when a trigger's output reached it and when the broker delivered each
message to it (`segments`: emit → daemon, emit → delivered for `pass`, pass → delivered for
`sink`). `loop_lag_ms` is how late a 5 ms timer in the daemon fires (p99, max): the daemon's
own stalls, apart from the broker's.

    .venv/bin/python bench/rabbitmq_connections.py      # ROUNDS=4 RATE=100 VARIANTS=two,one,seed

Prints one JSON line a run, then the medians per variant. Not part of `make bench` (about
3 minutes); docs/benchmarks.md ("One connection or two") has its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent, HERE.parent / "daemon"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bench_rabbitmq as bench  # noqa: E402
from common import loadavg, pct  # noqa: E402
from tests.broker import start_broker  # noqa: E402

from deployd.runtime.rabbitmq import broker as broker_mod  # noqa: E402
from deployd.runtime.rabbitmq import router as router_mod  # noqa: E402
from deployd.runtime.rabbitmq import runner as runner_mod  # noqa: E402

RATE = int(os.environ.get("RATE", "100"))
ROUNDS = int(os.environ.get("ROUNDS", "4"))
VARIANTS = os.environ.get("VARIANTS", "two,one,seed").split(",")
SKIP = 300  # the first messages of a run (its warm-up) are left out of hops and segments

PASS = """\
import time


def process(msg, cfg):
    return {**msg["body"], "tp": time.time()}
"""
bench.CODE = {
    **bench.CODE,
    "pass": PASS,
    "sink": bench.SINK.replace(
        'line["t_sched"] = body["s"]',
        'line["t_sched"] = body["s"]\n        line["tp"] = body.get("tp")',
    ),
}
VARIANT = {"name": "two"}
SEGMENTS: dict[str, list[float]] = {"emit_to_daemon": [], "to_pass": [], "to_sink": []}
LAG: list[float] = []

_consumer_channel = broker_mod.Broker.consumer_channel


async def consumer_channel(self: broker_mod.Broker) -> Any:
    """Variant "one": consumers on the publishing connection, as before the split."""
    if VARIANT["name"] == "one":
        assert self.conn is not None
        return await self.conn.channel()
    return await _consumer_channel(self)


_commit = router_mod.AmqpRouter.commit


def commit(self: Any, spec: Any, index: int, res: Any, row: Any = None) -> Any:
    if row is None and res.outputs:
        now = time.time()
        for text, _extra in res.outputs:
            body = json.loads(text)
            if "t" in body:
                SEGMENTS["emit_to_daemon"].append((now - body["t"]) * 1000)
    return _commit(self, spec, index, res, row)


_on_message = runner_mod.Consumer._on_message


async def on_message(self: Any, message: Any) -> None:
    now = time.time()
    with_body = json.loads(message.body).get("body", {})
    stamp = with_body.get("t" if self.step == "pass" else "tp")
    if stamp is not None:
        SEGMENTS["to_pass" if self.step == "pass" else "to_sink"].append((now - stamp) * 1000)
    await _on_message(self, message)


broker_mod.Broker.consumer_channel = consumer_channel  # type: ignore[method-assign]
router_mod.AmqpRouter.commit = commit  # type: ignore[method-assign]
runner_mod.Consumer._on_message = on_message  # type: ignore[method-assign]


def figures(values: list[float]) -> list[float]:
    values = values[SKIP:]
    return [round(statistics.median(values), 1), round(pct(values, 0.99), 1)] if values else []


async def lag_monitor(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.005)
        LAG.append((loop.time() - t - 0.005) * 1000)


async def deployd_run(root: Path, broker: Any, flows: bench.Flows) -> dict[str, Any]:
    for values in (*SEGMENTS.values(), LAG):
        values.clear()
    stop = asyncio.Event()
    monitor = asyncio.get_running_loop().create_task(lag_monitor(stop))
    try:
        res = await bench.deployd_phase("rabbitmq", root, broker, flows, RATE, True)
    finally:
        stop.set()
        await monitor
    out = max(root.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    lines = [r for r in lines if r.get("tp")]
    return {
        "p50": res["latency_ms"]["p50"],
        "p99": res["latency_ms"]["p99"],
        "daemon_cpu_percent": res["cpu_percent"]["daemon"],
        "hops_ms": {
            "emit_to_pass": figures([(r["tp"] - r["t_emit"]) * 1000 for r in lines]),
            "pass_to_sink": figures([(r["t_recv"] - r["tp"]) * 1000 for r in lines]),
        },
        "segments_ms": {k: figures(v) for k, v in SEGMENTS.items()},
        "loop_lag_ms": [round(pct(LAG[200:], 0.99), 1), round(max(LAG[200:] or [0]), 1)],
    }


def main() -> None:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="deployd-bench-conns-") as tmp:
        root = Path(tmp)
        broker = start_broker(root / "broker", vhosts=ROUNDS * len(VARIANTS) + 2)
        flows = bench.Flows(root)
        try:
            for i in range(ROUNDS):
                for name in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                    VARIANT["name"] = name
                    if name == "seed":
                        s = bench.seed_run(
                            broker, root / "seed", seconds=bench.SEED_LATENCY_S, rate=RATE
                        )
                        run = {"p50": s["latency_p50_ms"], "p99": s["latency_p99_ms"]}
                    else:
                        run = asyncio.run(deployd_run(root, broker, flows))
                    run = {"round": i, "variant": name, "load": loadavg()[0], **run}
                    runs[name].append(run)
                    print(json.dumps(run), flush=True)
        finally:
            broker.close()
    summary = {
        name: {
            "p50_median": round(statistics.median(r["p50"] for r in rs), 2),
            "p99_median": round(statistics.median(r["p99"] for r in rs), 2),
            "p99_runs": [r["p99"] for r in rs],
        }
        for name, rs in runs.items()
        if rs
    }
    print(json.dumps({"rate": RATE, "rounds": ROUNDS, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
