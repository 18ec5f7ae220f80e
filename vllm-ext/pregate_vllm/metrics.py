"""A Prometheus `/metrics` endpoint for one expert service, served from a daemon thread.

The text is the library's own (`pregate_moe_metrics_text`): the expert cache's and the runtime's
counters, in the same families as pregate's server. Each vLLM worker (tensor-parallel rank) holds
its own service, so each serves its own port.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .ops import MoeService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer:
    """Serves `GET /metrics` for `service` on `host:port` (port 0: any free port, see `port`)
    until `close()` or the process exits."""

    def __init__(self, service: MoeService, host: str = "127.0.0.1", port: int = 0) -> None:
        def text() -> bytes:
            return service.metrics_text().encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                try:
                    body = text()
                except Exception as e:  # noqa: BLE001 (a closed service answers 503, not a crash)
                    self.send_error(503, str(e))
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # scrapes are not worth a log line each

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"pregate metrics: cannot listen on {host}:{port}: {e}") from e
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pregate-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stops serving (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
