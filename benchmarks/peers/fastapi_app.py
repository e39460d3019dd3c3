"""Peer: a hand-written FastAPI app under uvicorn, the few lines a user writes by hand.

    run/peers/fastapi/venv/bin/python benchmarks/peers/fastapi_app.py PORT

Configuration (FastAPI's "Server Workers" page and uvicorn's deployment docs, for a 2-core
machine): one uvicorn worker process per core (2), uvicorn[standard] (uvloop, httptools); the
body is read on the event loop and the blocking decode + inference runs in Starlette's thread
pool (run_in_threadpool, what FastAPI does itself for `def` endpoints), never on the loop. Each
worker's onnxruntime session takes cores // workers = 1 intra-op thread (the gateway's rule).
Access log off (uvicorn logs every request by default): the peers write no line per request
(see peer_model.py).
"""
from __future__ import annotations

import os
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from peer_model import Classifier, ImageError
from starlette.concurrency import run_in_threadpool

WORKERS = os.cpu_count() or 1

app = FastAPI()
model = Classifier(processes=WORKERS)


@app.post("/classify")
async def classify(request: Request):
    data = await request.body()
    try:
        return {"predictions": await run_in_threadpool(model, data)}
    except ImageError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run("fastapi_app:app", host="127.0.0.1", port=int(sys.argv[1]), workers=WORKERS,
                access_log=False, app_dir=os.path.dirname(os.path.abspath(__file__)))
