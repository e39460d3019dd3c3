"""Peer: a hand-written Flask app under gunicorn, the few lines a user writes by hand.

    run/peers/flask/venv/bin/python benchmarks/peers/flask_app.py PORT

Configuration (gunicorn's docs, for a 2-core machine): gthread workers (the docs' choice when
requests block in C code that releases the GIL, as onnxruntime does); (2 x cores) + 1 = 5
worker processes, gunicorn's "Design" page's recommended starting point; 4 threads each (the
lower end of the docs' "2-4 x $(NUM_CORES)" for threads), so 8 clients always find a free
thread. Each worker holds its own onnxruntime session with cores // workers = 1 intra-op thread
(the gateway's rule), so 5 sessions do not fight over 2 cores. No access log (gunicorn's
default, like `gateway serve`).
"""
from __future__ import annotations

import os
import sys

from flask import Flask, jsonify, request
from peer_model import Classifier, ImageError

WORKERS = 2 * (os.cpu_count() or 1) + 1
THREADS = 2 * (os.cpu_count() or 1)

app = Flask(__name__)
model = Classifier(processes=WORKERS)  # loaded per worker (gunicorn imports the app after fork)


@app.post("/classify")
def classify():
    try:
        return jsonify(predictions=model(request.get_data()))
    except ImageError as exc:
        return jsonify(error=str(exc)), 400


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    os.execv(gunicorn, [gunicorn, "--worker-class", "gthread", "--workers", str(WORKERS),
                        "--threads", str(THREADS), "--bind", f"127.0.0.1:{sys.argv[1]}",
                        "--chdir", here, "flask_app:app"])
