"""Run the app with uvicorn: in the foreground (``kt serve``) or on a thread (tests, load test).

``ConnectionLimits`` bound what one connection may hold: uvicorn's own options give the connection limit
(``limit_concurrency``: past it, requests are answered 503) and the idle keep-alive timeout; the header and
body read timeouts, which uvicorn lacks, come from ``GuardedH11Protocol``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass
class ConnectionLimits:
    header_timeout: float = 10.0  # s from a request's first byte (or a new connection) to its last header
    body_timeout: float = 60.0  # s from the last header to the body's last byte
    max_connections: int = 256  # open connections and running requests; beyond: 503
    keep_alive: float = 5.0  # s an idle kept-alive connection stays open


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus read timeouts: a client that takes longer than ``header_timeout`` to send
    its request line and headers, or ``body_timeout`` to send its body, gets a 408 and the connection closes.
    (uvicorn alone keeps a connection that drips a header byte every few seconds for ever.)"""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._waiting_for = "headers"
        self._arm(self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._read_timer is None:
            self._waiting_for = "headers"  # the first bytes of the next request on a kept-alive connection
            self._arm(self.limits.header_timeout)
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._waiting_for = "body"
                self._arm(self.limits.body_timeout)
        elif self.conn.their_state is not h11.IDLE:  # the whole request is in
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._waiting_for == "headers" or not self.cycle.response_started:
            self.transport.write(_TIMED_OUT)
        self.transport.close()


def uvicorn_config(app, host: str, port: int, limits: ConnectionLimits | None = None, **kwargs) -> uvicorn.Config:
    """The one uvicorn configuration of ``kt serve``, the tests and the load test."""
    limits = limits or ConnectionLimits()
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=limits.max_connections,
                          timeout_keep_alive=limits.keep_alive, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """``uvicorn.Server`` on a daemon thread; ``start()`` returns once it accepts connections."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 limits: ConnectionLimits | None = None):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, limits, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="ktcore-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
