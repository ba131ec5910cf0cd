"""While the deploy restarts the server on purpose, the proxy says so.

`routectl.py switch` writes a note (tasks/services.maintenance_file) for the
length of a restart; the proxy (its real zipapp, its own process) reads it on
its error paths. The "server" here is a port nothing listens on, as during a
stop-first restart.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.fixtures.ports import free_port
from tests.fixtures.proxy import start_proxy

pytestmark = pytest.mark.timeout(60)


def chat(url: str) -> tuple[int, dict, dict]:
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_503_says_the_model_is_restarting_while_the_note_exists(tmp_path):
    note = tmp_path / "maintenance.json"
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", "--maintenance-file", str(note),
                        "--retry-after-ms", "2000", log_path=tmp_path / "proxy.log")
    try:
        status, headers, body = chat(proxy.url)
        assert status == 503 and body["error"]["message"].startswith("upstream not ready")
        note.write_text(json.dumps({"message": "the model is restarting on release abc"}))
        status, headers, body = chat(proxy.url)
        assert status == 503 and headers["Retry-After"] == "2"
        assert body["error"]["message"] == "the model is restarting on release abc; retry after 2 s"
        assert body["error"]["type"] == "upstream_restarting"
        note.unlink()
        status, _, body = chat(proxy.url)
        assert body["error"]["message"].startswith("upstream not ready")
    finally:
        proxy.stop()


def test_a_note_past_its_end_is_not_trusted(tmp_path):
    """A switch killed half-way (SIGKILL, a power cut) leaves its note behind: past
    the `until` routectl wrote, the proxy says what is really wrong again."""
    note = tmp_path / "maintenance.json"
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", "--maintenance-file", str(note),
                        log_path=tmp_path / "proxy.log")
    try:
        now = time.time()
        note.write_text(json.dumps({"message": "the model is restarting on release abc",
                                    "since": now, "until": now + 600}))
        status, _, body = chat(proxy.url)
        assert status == 503 and body["error"]["type"] == "upstream_restarting"
        note.write_text(json.dumps({"message": "the model is restarting on release abc",
                                    "since": now - 700, "until": now - 100}))
        status, _, body = chat(proxy.url)
        assert status == 503 and body["error"]["message"].startswith("upstream not ready"), body
        assert body["error"]["type"] == "upstream_unavailable"
    finally:
        proxy.stop()
