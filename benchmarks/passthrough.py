"""The floor for any Python HTTP front: a bare WSGI app under gunicorn (gthread, like `gateway
serve`) that forwards a V2 infer body to Triton with urllib3 and returns Triton's answer as it
is: no Flask, no parsing, no checks. benchmarks/v2_bench.py times it beside the gateway, so
the gateway's own cost is told apart from the cost of one more Python hop for a 600 KB tensor.

    gunicorn -k gthread --threads 8 -b 127.0.0.1:PORT --chdir benchmarks passthrough:app
    (TRITON_URL=127.0.0.1:8010 by default)
"""
import os

import urllib3

HOST, PORT = os.environ.get("TRITON_URL", "127.0.0.1:8010").rsplit(":", 1)
POOL = urllib3.HTTPConnectionPool(HOST, int(PORT), maxsize=16)
KEPT = ("inference-header-content-length", "content-type", "content-length")


def app(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    headers = {"Inference-Header-Content-Length": environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH", "")}
    answer = POOL.urlopen("POST", environ["PATH_INFO"], body=body, headers=headers)
    start_response(f"{answer.status} {answer.reason}", [(k, v) for k, v in answer.headers.items() if k.lower() in KEPT])
    return [answer.data]
