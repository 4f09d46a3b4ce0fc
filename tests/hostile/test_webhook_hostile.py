"""Hostile webhook requests against a real daemon: each gets its specific answer, none builds.

Two components deploy from local bare repositories that nothing watches or polls, so a
commit pushed there is built only if a webhook is accepted: `signed` has a secret, `open`
has none (unsigned hooks are accepted on loopback). Every case names the unbuilt commit on
`main`, so a signature bypass or a parser slip would show up as a build. The last step is
a valid delivery, proving the setup does deploy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import HTTP, Daemon, free_port, git, make_component

SECRET = "hostile-secret-5b1c9e"
MAX_BYTES = 65536
MAIN = "refs/heads/main"


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def push_body(sha: str, ref: str = MAIN, **extra: Any) -> bytes:
    """A GitHub-shaped push, with the fields deployd reads and some of the usual noise."""
    return json.dumps(
        {
            "ref": ref,
            "before": "0" * 39 + "1",
            "after": sha,
            "created": False,
            "deleted": False,
            "repository": {
                "full_name": "acme/signed",
                "clone_url": "https://git.example.com/acme/signed.git",
            },
            "pusher": {"name": "octo"},
            **extra,
        }
    ).encode()


def github(
    body: bytes, signature: str | None = "good", content_type: str = "application/json"
) -> dict[str, str]:
    headers = {
        "Content-Type": content_type,
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    if signature == "good":
        headers["X-Hub-Signature-256"] = "sha256=" + sign(body)
    elif signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return headers


Case = tuple[str, dict[str, str], bytes]  # (component, headers, body)


OTHER = push_body("f" * 40)
# (id, sha → request, status, words of the answer)
CASES: list[tuple[str, Callable[[str], Case], int, str]] = [
    # signatures and secrets
    (
        "no-signature",
        lambda s: ("signed", github(push_body(s), None), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    (
        "wrong-secret",
        lambda s: (
            "signed",
            github(push_body(s), "sha256=" + sign(push_body(s), "wrong")),
            push_body(s),
        ),
        401,
        "signature or token missing or wrong",
    ),
    (
        "malformed-signature",
        lambda s: ("signed", github(push_body(s), "sha256=zz-not-hex"), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    (
        "signature-without-prefix",
        lambda s: ("signed", github(push_body(s), sign(push_body(s))), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    (
        "sha1-signature-only",
        lambda s: (
            "signed",
            {
                **github(push_body(s), None),
                "X-Hub-Signature": "sha1="
                + hmac.new(SECRET.encode(), push_body(s), "sha1").hexdigest(),
            },
            push_body(s),
        ),
        401,
        "signature or token missing or wrong",
    ),
    (
        "signature-of-another-body",
        lambda s: ("signed", github(OTHER), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    (
        "empty-signature",
        lambda s: ("signed", github(push_body(s), ""), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    (
        "gitlab-wrong-token",
        lambda s: (
            "signed",
            {
                "Content-Type": "application/json",
                "X-Gitlab-Event": "Push Hook",
                "X-Gitlab-Token": SECRET + "x",
            },
            json.dumps({"object_kind": "push", "ref": MAIN, "after": s}).encode(),
        ),
        401,
        "signature or token missing or wrong",
    ),
    (
        "gitea-wrong-signature",
        lambda s: (
            "signed",
            {
                "Content-Type": "application/json",
                "X-Gitea-Event": "push",
                "X-Gitea-Signature": sign(push_body(s), SECRET.upper()),
            },
            push_body(s),
        ),
        401,
        "signature or token missing or wrong",
    ),
    (
        "bitbucket-unsigned",
        lambda s: (
            "signed",
            {"Content-Type": "application/json", "X-Event-Key": "repo:push"},
            json.dumps(
                {"push": {"changes": [{"new": {"name": "main", "target": {"hash": s}}}]}}
            ).encode(),
        ),
        401,
        "signature or token missing or wrong",
    ),
    (
        "generic-unsigned-to-a-signed-component",
        lambda s: ("signed", {"Content-Type": "application/json"}, push_body(s)),
        404,
        "unknown component",
    ),
    (
        "unknown-component-signed",
        lambda s: ("nope", github(push_body(s)), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    (
        "unknown-component-unsigned",
        lambda s: ("nope", {"Content-Type": "application/json"}, push_body(s)),
        404,
        "unknown component",
    ),
    (
        "component-traversal",
        lambda s: ("..%2Fsigned", github(push_body(s)), push_body(s)),
        404,
        "Not Found",  # no such route: a name never holds '/'
    ),
    (
        "component-shell",
        lambda s: ("$(reboot)", {"Content-Type": "application/json"}, push_body(s)),
        404,
        "unknown component",
    ),
    (
        "component-unicode",
        lambda s: ("s%C3%AFgned", github(push_body(s)), push_body(s)),
        401,
        "signature or token missing or wrong",
    ),
    # bodies (correctly signed, so the parser is reached)
    ("empty-body", lambda s: ("signed", github(b""), b""), 400, "body is not valid JSON"),
    (
        "truncated-json",
        lambda s: ("signed", github(push_body(s)[:-7]), push_body(s)[:-7]),
        400,
        "body is not valid JSON",
    ),
    (
        "huge-json",
        lambda s: (
            "signed",
            github(push_body(s, pad="x" * MAX_BYTES)),
            push_body(s, pad="x" * MAX_BYTES),
        ),
        413,
        f"body larger than daemon.max_webhook_bytes ({MAX_BYTES} bytes)",
    ),
    (
        "deep-nesting",
        lambda s: ("signed", github(b"[" * 30000 + b"]" * 30000), b"[" * 30000 + b"]" * 30000),
        400,
        "body is not valid JSON",
    ),
    (
        "deep-nesting-in-a-field",
        lambda s: (
            "signed",
            github(b'{"x": ' + b"[" * 30000 + b"]" * 30000 + b"}"),
            b'{"x": ' + b"[" * 30000 + b"]" * 30000 + b"}",
        ),
        400,
        "body is not valid JSON",
    ),
    ("json-array", lambda s: ("signed", github(b"[1]"), b"[1]"), 400, "body must be a JSON object"),
    (
        "not-utf8",
        lambda s: ("signed", github(b'{"ref": "\xff"}'), b'{"ref": "\xff"}'),
        400,
        "body is not valid JSON",
    ),
    (
        "ref-missing",
        lambda s: ("open", github(b'{"after": "' + s.encode() + b'"}', None), b"{}"),
        400,
        "missing or malformed field 'ref'",
    ),
    (
        "ref-a-number",
        lambda s: ("open", github(b"", None), json.dumps({"ref": 5, "after": s}).encode()),
        400,
        "missing or malformed field 'ref'",
    ),
    (
        "after-shell",
        lambda s: ("open", github(b"", None), push_body("$(reboot)")),
        400,
        "'after' is not a commit sha",
    ),
    (
        "after-unicode",
        lambda s: ("open", github(b"", None), push_body("ünïcödé" * 6)),
        400,
        "'after' is not a commit sha",
    ),
    (
        "malformed-delivery-id",
        lambda s: (
            "open",
            {**github(b"", None), "X-GitHub-Delivery": "a b;$(reboot)"},
            push_body(s),
        ),
        400,
        "malformed delivery id header",
    ),
    # content types
    (
        "text-plain",
        lambda s: ("signed", github(push_body(s), content_type="text/plain"), push_body(s)),
        415,
        "send Content-Type: application/json",
    ),
    (
        "no-content-type",
        lambda s: ("signed", {"X-GitHub-Event": "push"}, push_body(s)),
        415,
        "send Content-Type: application/json",
    ),
    (
        "multipart",
        lambda s: ("signed", github(push_body(s), content_type="multipart/form-data"), b"--x"),
        415,
        "send Content-Type: application/json",
    ),
    (
        "form-to-generic",
        lambda s: (
            "open",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"ref=refs/heads/main&after=" + s.encode(),
        ),
        415,
        "send Content-Type: application/json",
    ),
    (
        "form-without-payload",
        lambda s: (
            "signed",
            github(b"x=1", content_type="application/x-www-form-urlencoded"),
            b"x=1",
        ),
        400,
        "form-encoded body has no payload field",
    ),
    # refs that are not the deployed branch (valid, not deployable: 200 with a reason)
    (
        "ref-shell",
        lambda s: ("open", github(b"", None), push_body(s, ref="refs/heads/$(touch /tmp/pwn)")),
        200,
        "push to refs/heads/$(touch /tmp/pwn) ignored",
    ),
    (
        "ref-unicode",
        lambda s: ("open", github(b"", None), push_body(s, ref="refs/heads/mäin")),
        200,
        "push to refs/heads/m\\u00e4in ignored",
    ),
    (
        "ref-newline",
        lambda s: ("open", github(b"", None), push_body(s, ref=MAIN + "\n")),
        200,
        "ignored; open deploys refs/heads/main",
    ),
    (
        "ref-tag-named-main",
        lambda s: ("open", github(b"", None), push_body(s, ref="refs/tags/main")),
        200,
        "tag push (refs/tags/main) ignored",
    ),
    (
        "branch-deleted",
        lambda s: ("open", github(b"", None), push_body("0" * 40)),
        200,
        "was deleted; the recent version stays",
    ),
    (
        "other-event",
        lambda s: ("open", {**github(b"", None), "X-GitHub-Event": "issues"}, push_body(s)),
        200,
        "event 'issues' ignored",
    ),
]


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """One daemon for the module (the cases only read), and the unbuilt commit per component."""
    root = tmp_path_factory.mktemp("webhooks")
    (root / "home").mkdir()
    bares = {name: root / "remotes" / f"{name}.git" for name in ("signed", "open")}
    for bare in bares.values():
        git("init", "-q", "--bare", "-b", "main", str(bare))
    d = Daemon(
        root=root,
        port=free_port(),
        components=[
            {"name": "signed", "url": str(bares["signed"]), "watch": False},
            {"name": "open", "url": str(bares["open"]), "watch": False},
        ],
        daemon_extra={"poll_interval": "0", "max_webhook_bytes": MAX_BYTES, "webhook_wait": "2s"},
        env={"HOME": str(root / "home")},
    )
    d.components[0]["webhook_secret"] = SECRET
    d.start()
    d.wait_ready()  # its start-up reconciliation done: the commits below are pushed after it
    shas = {}
    for name, bare in bares.items():
        work = make_component(root / "work" / name)
        work.remote = bare
        shas[name] = work.commit_push(f"unbuilt {name}")
    yield d, shas
    assert d.stop() == 0, d.log()


@pytest.mark.parametrize(
    ("build", "status", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_webhook(
    hooked: tuple[Daemon, dict[str, str]], build: Callable[[str], Case], status: int, words: str
) -> None:
    d, shas = hooked
    component, headers, body = build(shas["signed"])
    if component in shas:  # name the unbuilt commit of the component addressed
        component, headers, body = build(shas[component])
    response = HTTP.post(f"{d.url}/hooks/{component}", headers=headers, content=body, timeout=10)
    assert response.status_code == status, response.text[:300]
    assert words in response.text, response.text[:300]


def _read_response(sock: socket.socket) -> str:
    """One whole HTTP response: the head and body may arrive in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(rest) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    return (head + b"\r\n\r\n" + rest).decode(errors="replace")


def test_a_huge_content_length_is_refused_before_the_body_is_read(hooked: Any) -> None:
    """A client announcing 6 MB and sending a few bytes gets 413 at once, not a hang."""
    d, shas = hooked
    body = push_body(shas["signed"])
    head = "".join(
        f"{k}: {v}\r\n" for k, v in {**github(body), "Content-Length": str(MAX_BYTES * 100)}.items()
    )
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(f"POST /hooks/signed HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        answer = _read_response(sock)
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "max_webhook_bytes" in answer
    assert d.builds() == []
    assert HTTP.get(d.url + "/healthz", timeout=5).status_code == 200


def test_nothing_was_built_but_a_valid_delivery_is(hooked: tuple[Daemon, dict[str, str]]) -> None:
    """Runs after the cases: none of them queued a build; the setup does deploy."""
    d, shas = hooked
    assert d.builds() == []
    assert HTTP.get(d.url + "/healthz", timeout=5).status_code == 200
    body = push_body(shas["signed"])
    ok = HTTP.post(f"{d.url}/hooks/signed", headers=github(body), content=body, timeout=10)
    assert ok.status_code == 202, ok.text
    assert d.wait_build("signed", shas["signed"])["status"] == "succeeded"
    again = HTTP.post(f"{d.url}/hooks/signed", headers=github(body), content=body, timeout=10)
    assert again.status_code == 200 and "duplicate delivery" in again.text, again.text
    assert [b["sha"] for b in d.builds()] == [shas["signed"]]
    assert "Traceback" not in d.log()
