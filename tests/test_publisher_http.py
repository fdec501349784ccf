"""The publisher's kept-alive HTTP connections (``consumers.engine_http.Connections``), over a real
HTTP/1.1 server in this process.

Reuse is what makes it fast; the danger is reusing a connection the server has already closed
(uvicorn, in front of SGLang, closes idle ones after 5 s), which would turn into a failed weight
update.  So: consecutive requests share one TCP connection; a connection the server closed while
idle, or one idle longer than ``idle_s``, is replaced without an error; a reply marked
``Connection: close`` is not reused; errors still name the URL and what was awaited.

    /work/venv/bin/pytest tests/test_publisher_http.py -q
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from consumers.engine_http import Connections, PublishError, post_json


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 0.5  # the server drops a connection idle this long (like uvicorn's keep-alive timeout)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.peers.append(self.client_address[1])  # type: ignore[attr-defined]
        reply = json.dumps({"success": True, "echo": body}).encode()
        self.send_response(200 if body.get("status", 200) == 200 else body["status"])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        if body.get("close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, list[int]]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.peers = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.peers  # type: ignore[attr-defined]
    srv.shutdown()
    srv.server_close()


def test_requests_share_one_connection_until_the_server_closes_it(server: tuple[str, list[int]]) -> None:
    url, peers = server
    conns = Connections(idle_s=30.0)
    for i in range(3):
        assert post_json(f"{url}/x", {"i": i}, 5, "test")["echo"] == {"i": i}
    assert len(set(peers)) == 3, peers  # without a pool: a connection each
    peers.clear()
    for i in range(3):
        assert post_json(f"{url}/x", {"i": i}, 5, "test", conns)["echo"] == {"i": i}
    assert len(set(peers)) == 1, peers  # one TCP connection (same client port) for all three
    # The server drops the idle connection after 0.5 s; the next request notices before sending
    # and opens a new one instead of failing.
    peers.clear()
    for i in range(2):
        post_json(f"{url}/x", {"i": i}, 5, "test", conns)
    time.sleep(1.0)
    assert post_json(f"{url}/x", {"i": 9}, 5, "test", conns)["echo"] == {"i": 9}
    assert len(peers) == 3 and peers[0] == peers[1] != peers[2], peers
    # A reply that says Connection: close is not put back.
    post_json(f"{url}/x", {"close": True}, 5, "test", conns)
    post_json(f"{url}/x", {"i": 1}, 5, "test", conns)
    assert peers[3] == peers[2] != peers[4], peers
    conns.close()


def test_connection_idle_longer_than_idle_s_is_not_reused(server: tuple[str, list[int]]) -> None:
    url, peers = server
    conns = Connections(idle_s=0.1)
    post_json(f"{url}/x", {}, 5, "test", conns)
    time.sleep(0.2)  # past idle_s, still within the server's 0.5 s
    post_json(f"{url}/x", {}, 5, "test", conns)
    assert len(set(peers)) == 2, peers


def test_errors_name_the_url_and_what_was_awaited(server: tuple[str, list[int]]) -> None:
    url, _ = server
    conns = Connections()
    with pytest.raises(PublishError, match=r"/x: HTTP 503 while waiting for the test reply"):
        post_json(f"{url}/x", {"status": 503}, 5, "the test reply", conns)
    with pytest.raises(PublishError, match="only http:// engine URLs"):
        post_json("https://127.0.0.1:1/x", {}, 5, "test", conns)
    with pytest.raises(PublishError, match="request failed while waiting for nothing"):
        post_json("http://127.0.0.1:1/x", {}, 5, "nothing", conns)
