"""The webhook intake without HTTP: component, headers and body in, a `Decision` out."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from deployd import config as cfgmod
from deployd.metrics import Metrics
from deployd.sources.webhook import Decision, WebhookIntake
from deployd.store import Store
from deployd.types import PushNotice

SHA = "ab" * 20
BODY = json.dumps({"ref": "refs/heads/main", "after": SHA, "before": "0" * 40}).encode()


def _config(tmp_path: Path, secret: str) -> cfgmod.Config:
    return cfgmod.parse(
        {
            "daemon": {"state_dir": str(tmp_path / "var"), "max_webhook_bytes": 1024},
            "components": [{"name": "app", "webhook_secret": secret}],
        },
        base=tmp_path,
    )


def _signed(secret: str, body: bytes = BODY, delivery: str = "d-1") -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "x-github-event": "push",
        "x-github-delivery": delivery,
        "x-hub-signature-256": f"sha256={digest}",
    }


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.config = _config(tmp_path, "first-secret")
        self.store = Store.open(tmp_path / "state.db")
        self.accepting = True
        self.notices: list[PushNotice] = []
        self.intake = WebhookIntake(
            lambda: self.config,
            self.store,
            self.notify,
            Metrics(),
            lambda: self.accepting,
        )

    def notify(self, notice: PushNotice) -> bool:
        self.notices.append(notice)
        return True

    def handle(self, headers: dict[str, str], body: bytes | list[bytes] = BODY) -> Decision:
        async def chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        async def run() -> Decision:
            raw = body if isinstance(body, bytes) else chunks(body)
            decision = await self.intake.handle("app", headers, raw)
            self.intake.deliveries.flush()
            return decision

        return asyncio.run(run())


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.store.close()


def test_a_signed_push_is_queued_and_its_notice_returned(harness: Harness) -> None:
    decision = harness.handle(_signed("first-secret"))
    assert decision.status == 202
    assert decision.body == {"status": "queued", "component": "app", "sha": SHA, "delivery": "d-1"}
    assert decision.notice == PushNotice("app", "refs/heads/main", SHA, "webhook:github", "d-1")
    assert harness.store.has_delivery("app", "d-1")
    again = harness.handle(_signed("first-secret"))
    assert (again.status, again.notice) == (200, None)
    assert again.body["reason"] == "duplicate delivery d-1"


def test_a_wrong_signature_is_refused_before_the_body_is_parsed(harness: Harness) -> None:
    headers = _signed("first-secret", b"not json at all")
    headers["x-hub-signature-256"] = "sha256=" + "0" * 64
    decision = harness.handle(headers, b"not json at all")
    assert decision.status == 401 and decision.notice is None
    assert not harness.store.has_delivery("app", "d-1")


def test_a_reloaded_secret_applies_to_the_next_request(harness: Harness, tmp_path: Path) -> None:
    harness.config = _config(tmp_path, "second-secret")
    assert harness.handle(_signed("first-secret")).status == 401
    assert harness.handle(_signed("second-secret")).status == 202


def test_a_stopping_daemon_answers_503_with_retry_after(harness: Harness) -> None:
    harness.accepting = False
    decision = harness.handle(_signed("first-secret"))
    assert (decision.status, decision.headers) == (503, {"Retry-After": "5"})


def test_a_streamed_body_over_the_limit_is_413(harness: Harness) -> None:
    decision = harness.handle(_signed("first-secret"), [b"x" * 1000, b"x" * 1000])
    assert decision.status == 413 and decision.notice is None


def test_nothing_below_the_api_imports_an_http_framework() -> None:
    code = (
        "import sys, deployd.service, deployd.sources.webhook, deployd.sources.poll, deployd.ops\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'fastapi', 'starlette', 'uvicorn'})\n"
        "print(' '.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
