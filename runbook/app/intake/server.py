"""uvicorn, bounded: no connection may hold the intake by sending half a request, or by never sending one.

uvicorn's h11 protocol has ``timeout_keep_alive`` (idle between requests) but no deadline for receiving a request:
its keep-alive timer is cancelled by every byte, so a client that sends half a header and stops keeps its
connection, and its file descriptor, forever; 1,100 of them under the common ``LimitNOFILE=1024`` left real alerts
unanswered. ``bounded_protocol`` adds, per connection:

- a header deadline (from the connection, or from the previous response on a kept-alive one) and a body deadline
  (from the end of the headers): a request not received in time is answered 408 (or just closed) and counted;
- a cap on open connections (``Limits.connection_cap``, from the open-file limit): when a new connection goes
  over it, the connection that has waited longest for its client (idle, half a header, a stalled body) is closed,
  so stalled connections cannot crowd out a real alert. Connections whose request is complete are never chosen.

asyncio uses one number for the listen queue and for how many connections it accepts per turn of the loop; the
intake wants a deep queue (a burst waits in the kernel rather than having its SYNs dropped, which costs a real
alert a 1 s retransmission) and small batches (see Limits.accept_batch), so ``IntakeServer`` deepens the queue
after uvicorn has started listening.

uvicorn's own ``limit_concurrency`` is not used: it counts idle connections too, so stalled sockets would turn real
alerts into 503s. The intake limits the webhooks it processes at once instead (``Limits.max_in_flight``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from runbook.app.intake.limits import Limits, RateLimitedLog, install_rate_limit

log = logging.getLogger("runbook.intake.connections")

LISTEN_QUEUE = 4096  # the kernel caps it at net.core.somaxconn
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class BoundedH11Protocol(H11Protocol):
    """One connection. The class attributes are shared by the connections of one server (see bounded_protocol)."""

    limits: ClassVar[Limits]
    cap: ClassVar[int]
    waiting: ClassVar[OrderedDict[BoundedH11Protocol, None]]  # connections waiting for their client, oldest first
    on_close: ClassVar[Callable[[str], None]]
    notes: ClassVar[RateLimitedLog]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = ""  # "header" | "body" while receiving a request, "" otherwise
        self._deadline: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------- uvicorn's hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.cap:
            oldest = next(iter(self.waiting), None)
            if oldest is None:  # every other connection is mid-request: this one waits its turn in the backlog
                self._close("refused", f"refused a connection from {self._peer()}: {self.cap} connections open, "
                                       "all with a request in progress")
                return
            oldest._close("evicted", f"closed the connection from {oldest._peer()} that waited longest for its "
                                     f"client: {self.cap} connections open (Limits.max_connections)")
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    # -------------------------------------------------------------- deadlines

    def _track(self) -> None:
        """Follow the client's side of the h11 state machine: waiting for headers, for a body, or done."""
        if self.transport is None or self.transport.is_closing():
            return
        theirs = self.conn.their_state
        if theirs is h11.IDLE:
            if self._phase != "header":  # a new request begins: a fresh header deadline, last in eviction order
                self._phase = "header"
                self.waiting.pop(self, None)
                self.waiting[self] = None
                self._arm(self.limits.header_timeout_s)
        elif theirs is h11.SEND_BODY:
            if self._phase != "body":
                self._phase = "body"
                self.waiting.setdefault(self, None)
                self._arm(self.limits.body_timeout_s)
        elif self._phase:  # the request is complete (or the connection is closing): nothing to wait for
            self._phase = ""
            self._disarm()
            self.waiting.pop(self, None)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase == "header":
            partial = bool(self.conn.trailing_data[0])
            if partial:  # it started a request: tell it why it ends (an idle connection is just closed)
                self.transport.write(REQUEST_TIMEOUT)
            self._close("header_timeout" if partial else "idle_timeout",
                        f"closed the connection from {self._peer()}: no complete request header within "
                        f"{self.limits.header_timeout_s:g} s")
        else:
            self._close("body_timeout", f"closed the connection from {self._peer()}: request body not complete "
                                        f"within {self.limits.body_timeout_s:g} s of its headers")

    def _close(self, reason: str, message: str) -> None:
        self._disarm()
        self.waiting.pop(self, None)
        self._phase = ""
        self.transport.close()
        type(self).on_close(reason)
        self.notes.note(reason, message)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def bounded_protocol(limits: Limits, on_close: Callable[[str], None] | None = None) -> type[BoundedH11Protocol]:
    """A protocol class for one server: its own connection list and limits (two intakes in one process, as in the
    tests, never evict each other's connections)."""

    class IntakeH11Protocol(BoundedH11Protocol):
        pass

    IntakeH11Protocol.limits, IntakeH11Protocol.cap = limits, limits.connection_cap()
    IntakeH11Protocol.waiting, IntakeH11Protocol.notes = OrderedDict(), RateLimitedLog(log)
    IntakeH11Protocol.on_close = staticmethod(on_close or _ignore)
    return IntakeH11Protocol


def _ignore(_reason: str) -> None:
    return None


def server_config(app: Any, host: str, port: int, limits: Limits, on_close: Callable[[str], None] | None = None,
                  **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration every intake runs with (`runbook intake`, `runbook serve`, tests, benchmarks)."""
    install_rate_limit("uvicorn.error", "asyncio")  # "Invalid HTTP request", EMFILE on accept: folded, not floods
    return uvicorn.Config(app, host=host, port=port, http=bounded_protocol(limits, on_close), ws="none",
                          lifespan="on", timeout_keep_alive=int(limits.keep_alive_s) or 1, limit_concurrency=None,
                          backlog=limits.accept_batch(),
                          access_log=False, log_level=kwargs.pop("log_level", "warning"), **kwargs)


class IntakeServer(uvicorn.Server):
    """uvicorn's server, its listen queue deepened to LISTEN_QUEUE once it listens (accept batches stay small)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                with socket.fromfd(sock.fileno(), sock.family, sock.type) as same_socket:  # a dup: same queue
                    same_socket.listen(LISTEN_QUEUE)
