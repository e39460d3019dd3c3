"""A STAND-IN engine for tests (not a real TorchServe): TorchServe's inference and management
APIs on loopback, answering each inference after ``delay_s`` with fixed logits (class 282 best),
any number of calls at once. It counts the inference calls it received."""
from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class SlowEngine:
    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # management API: the model's workers are ready
                body = json.dumps([{"modelName": "m", "workers": [{"status": "READY"}]}]).encode()
                self._send(200, body, "application/json")

            def do_POST(self):  # inference API: a .npy batch in, (N, 1000) logits out after the delay
                batch = np.load(io.BytesIO(self.rfile.read(int(self.headers["Content-Length"]))))
                with engine._lock:
                    engine.calls += 1
                time.sleep(engine.delay_s)
                logits = np.zeros((len(batch), 1000), np.float32)
                logits[:, 282] = 10.0
                out = io.BytesIO()
                np.save(out, logits)
                self._send(200, out.getvalue(), "application/octet-stream")

            def _send(self, status, body, kind):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # many calls at once: the default backlog of 5 would drop connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
