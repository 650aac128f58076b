"""uvicorn's HTTP/1.1 protocol with a header timeout.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for a client that
connects and sends nothing, or sends part of its request headers (measured: both sockets still open
after 40 s), so a few hundred silent sockets hold the server. :class:`HeaderTimeoutH11Protocol` closes a
connection whose request headers are not complete ``header_timeout`` seconds after the connection opened
or after the previous response; bodies that stall are :class:`covidscan.serve.app.StallGuard`'s part.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(seconds: float) -> type:
    """An ``H11Protocol`` subclass closing connections whose headers take longer than ``seconds``."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        header_timeout = float(seconds)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm()

        def _waiting_for_headers(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or getattr(cycle, "response_complete", False)

        def _arm(self) -> None:
            if getattr(self, "_header_timer", None) is None:
                self._header_cycle = getattr(self, "cycle", None)
                self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

        def _disarm(self) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and getattr(self, "cycle", None) is self._header_cycle:
                self.transport.close()  # no new request began: silent or partial headers

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_headers():
                self._arm()  # a new request's headers are (maybe partly) arriving
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()  # headers complete: the request is being handled

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle keep-alive: uvicorn's own timeout; new data re-arms ours

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
