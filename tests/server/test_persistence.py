"""Assistants data in SQLite survives a restart, and a ``kill -9`` mid-run loses no committed message.

The server runs as a subprocess (``python -m ktcore.server tiny:llama``) on a free loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from ktcore.server.runner import free_port


class Subprocess:
    def __init__(self, db, model="tiny:llama"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ktcore.server", model, "--port", str(self.port), "--db", str(db),
             "--threads", "1", "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("server did not come up in 120 s")
            time.sleep(0.2)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def _post(url, path, body=None):
    r = httpx.post(url + path, json=body or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _get(url, path):
    r = httpx.get(url + path, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _texts(messages):
    return [(m["role"], m["content"][0]["text"]["value"] if m["content"] else "") for m in messages["data"]]


def _wait_run(url, thread_id, run):
    deadline = time.monotonic() + 60
    while run["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
        run = _get(url, f"/v1/threads/{thread_id}/runs/{run['id']}")
    return run


@pytest.mark.slow  # three server processes start (each imports torch and transformers)
def test_restart_keeps_data_and_kill_9_loses_no_committed_message(tmp_path):
    """Three server lives on one database file: (1) create and run, stop cleanly; (2) everything is still
    there, then kill -9 in the middle of a streamed run; (3) all committed messages are there, the partial
    reply is saved up to its last commit and marked incomplete, the run is failed, the thread usable."""
    db = tmp_path / "assistants.sqlite3"

    srv = Subprocess(db)
    try:
        asst = _post(srv.url, "/v1/assistants", {"model": "tiny-llama", "instructions": "Be brief.", "temperature": 0})
        thread = _post(srv.url, "/v1/threads", {"messages": [{"role": "user", "content": "first"}]})
        run = _wait_run(srv.url, thread["id"], _post(srv.url, f"/v1/threads/{thread['id']}/runs",
                                                     {"assistant_id": asst["id"], "max_completion_tokens": 8}))
        assert run["status"] in ("completed", "incomplete")
        before = _texts(_get(srv.url, f"/v1/threads/{thread['id']}/messages?order=asc"))
    finally:
        srv.stop()
    assert [role for role, _ in before] == ["user", "assistant"] and before[1][1]

    srv = Subprocess(db, "tiny:llama?step_ms=40")  # ~25 tokens/s: the next run is still going when killed
    try:
        assert _get(srv.url, f"/v1/assistants/{asst['id']}")["instructions"] == "Be brief."
        assert _texts(_get(srv.url, f"/v1/threads/{thread['id']}/messages?order=asc")) == before
        assert _get(srv.url, f"/v1/threads/{thread['id']}/runs/{run['id']}")["status"] == run["status"]
        assert thread["id"] in [t["id"] for t in _get(srv.url, "/v1/threads")["data"]]

        _post(srv.url, f"/v1/threads/{thread['id']}/messages", {"role": "user", "content": "second"})
        seen = ""
        with httpx.stream("POST", f"{srv.url}/v1/threads/{thread['id']}/runs", timeout=60,
                          json={"assistant_id": asst["id"], "stream": True, "max_completion_tokens": 400}) as resp:
            started = None
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"thread.message.delta"' in line:
                    seen += json.loads(line[6:])["delta"]["content"][0]["text"]["value"]
                    started = started or time.monotonic()
                if started and time.monotonic() - started > 1.2:  # past a periodic save of the partial reply
                    srv.kill9()
                    break
        assert srv.proc.returncode == -signal.SIGKILL
    finally:
        if srv.proc.poll() is None:
            srv.kill9()

    with sqlite3.connect(db) as con:  # the file is sound and in WAL mode
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    srv = Subprocess(db)
    try:
        messages = _get(srv.url, f"/v1/threads/{thread['id']}/messages?order=asc")
        texts = _texts(messages)
        assert texts[:3] == before + [("user", "second")]
        assert texts[3][0] == "assistant" and messages["data"][3]["status"] == "incomplete"
        partial = texts[3][1]
        assert partial and (seen.startswith(partial) or partial.startswith(seen))
        runs = _get(srv.url, f"/v1/threads/{thread['id']}/runs")["data"]
        assert runs[0]["status"] == "failed" and "stopped" in runs[0]["last_error"]["message"]
        run = _wait_run(srv.url, thread["id"], _post(srv.url, f"/v1/threads/{thread['id']}/runs",
                                                     {"assistant_id": asst["id"], "max_completion_tokens": 4}))
        assert run["status"] in ("completed", "incomplete")  # the thread is usable again
    finally:
        srv.stop()
