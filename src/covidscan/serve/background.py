"""Run an app under uvicorn in a background thread on a free loopback port (tests, benchmarks, screenshots)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serve_in_background(app, *, http=None, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 at a free port in a daemon thread; yields the base URL
    (``http://127.0.0.1:PORT``) once the server accepts connections and stops it on exit.
    ``http``: a uvicorn HTTP protocol class (e.g. :func:`covidscan.serve.protocol.header_timeout_protocol`)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = {"http": http} if http is not None else {}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **extra))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("the in-process server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
