"""A loopback HTTP server standing in for the hosting services and chat webhooks.

It records every request (method, path, headers, body) and answers from a script: per path
prefix, a list of status codes used one per request (then 201). Tests read `requests`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    answered: int

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """`Receiver().start()`; `url`; `script(prefix, [500, 500])`; `requests`; `stop()`."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.scripts: dict[str, list[int]] = {}
        self.always: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                code = receiver.answer(self.path)
                with receiver.lock:
                    receiver.requests.append(
                        Received(
                            "POST",
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            code,
                        )
                    )
                reply = b'{"message": "scripted"}'
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, prefix: str, codes: list[int]) -> None:
        with self.lock:
            self.scripts[prefix] = list(codes)

    def answer(self, path: str) -> int:
        with self.lock:
            for prefix, code in self.always.items():
                if path.startswith(prefix):
                    return code
            for prefix, codes in self.scripts.items():
                if path.startswith(prefix) and codes:
                    return codes.pop(0)
        return 201

    def received(self, prefix: str = "", **match: Any) -> list[Received]:
        """Requests whose path starts with `prefix` and whose JSON body has the `match` items."""
        with self.lock:
            reqs = list(self.requests)
        out = []
        for req in reqs:
            if not req.path.startswith(prefix):
                continue
            try:
                body = req.json()
            except ValueError:
                continue
            if all(body.get(k) == v for k, v in match.items()):
                out.append(req)
        return out
