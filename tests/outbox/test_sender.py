"""The sender's rules on a real state database, without a daemon: backoff, lanes, give-up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from deployd import config as cfgmod
from deployd.outbox.sender import MAX_BACKOFF, OutboxSender, backoff
from deployd.store import Store
from deployd.store.outbox import OutboxStore

pytestmark = pytest.mark.timeout(60)
TOKEN = "ghp_UnitTestToken123456"


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    assert backoff(1, 2.0, rand=lambda: 1.0) == 2.0
    assert backoff(3, 2.0, rand=lambda: 1.0) == 8.0
    assert backoff(3, 2.0, rand=lambda: 0.0) == 4.0  # at least half
    assert backoff(40, 2.0, rand=lambda: 1.0) == MAX_BACKOFF


def test_a_down_target_waits_and_others_go_on_and_4xx_gives_up(tmp_path: Path) -> None:
    cfg = cfgmod.parse(
        {
            "components": [
                {
                    "name": name,
                    "report": "github",
                    "report_token": TOKEN,
                    "report_api": f"http://{name}.test",
                    "report_repo": f"acme/{name}",
                }
                for name in ("down", "up", "gone")
            ]
        },
        base=tmp_path,
    )
    store = Store.open(tmp_path / "db.sqlite")
    outbox = OutboxStore(store)
    with store.tx():
        for name in ("down", "down", "up", "gone"):
            outbox.add(
                f"component:{name}",
                "status",
                {"sha": "a" * 40, "context": f"c{name}", "state": "success"},
            )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        code = {"down.test": 503, "up.test": 201, "gone.test": 404}[request.url.host]
        return httpx.Response(code, text=f"echo {TOKEN}")

    async def run() -> None:
        sender = OutboxSender(lambda: cfg, store, asyncio.get_running_loop())
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await sender.drain(client)

    asyncio.run(run())
    # The down target's second row was not tried after its first failed.
    assert sorted(seen) == ["down.test", "gone.test", "up.test"]
    rows = {(r["target"], r["id"]): r for r in outbox.rows()}
    states = [(t, r["state"], r["attempts"]) for (t, _), r in sorted(rows.items())]
    assert states == [
        ("component:down", "pending", 1),
        ("component:down", "pending", 0),
        ("component:gone", "failed", 1),
        ("component:up", "delivered", 1),
    ]
    down = [r for (t, _), r in rows.items() if t == "component:down"]
    assert down[0]["next_at"] == down[1]["next_at"]  # the whole lane waits
    for row in rows.values():
        assert TOKEN not in (row["last_error"] or "")  # the echoed token is masked
    assert outbox.counts() == {"pending": 2, "failed": 1}
    store.close()
