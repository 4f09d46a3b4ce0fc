"""`make bench`: run the benchmark modules, print one JSON object, write bench/results.json.

Each module in MODULES lives next to this file and exposes ``run() -> dict``; its dict is
reported under the module's name. To add figures, write ``bench/bench_<thing>.py`` and add
its name below. ``python bench/run.py bench_foundation`` runs only the named modules.
Benchmarks are measurements, not tests: nothing here fails on a missed target; each figure
carries its target so a reader can compare.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULES = [
    "bench_foundation",
    "bench_webhook",
    "bench_node",
    "bench_flows",
    "bench_compare",
    "bench_service",
    "bench_scale",
    "bench_throughput",
    "bench_rabbitmq",
    "bench_ordinary",
    "bench_http",
    "bench_kubernetes",
]


def main(argv: list[str]) -> int:
    names = argv or MODULES
    sys.path.insert(0, str(HERE))
    results: dict[str, Any] = {
        "meta": {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        }
    }
    failed = False
    for name in names:
        started = time.monotonic()
        try:
            module = importlib.import_module(name)
            results[name] = module.run()
        except Exception as exc:  # one broken module must not hide the others' figures
            failed = True
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["bench_seconds"] = round(time.monotonic() - started, 1)
        print(f"bench: {name} done in {results[name]['bench_seconds']}s", file=sys.stderr)
    text = json.dumps(results, indent=2)
    (HERE / "results.json").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
