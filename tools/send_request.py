#!/usr/bin/env python3
"""The seed's client: classify one image and print each prediction as the seed did, e.g.
for the README's photo (after `make serve`):

    $ tools/send_request.py examples/cat.jpg --model-name efficientnet_lite0 [--url http://127.0.0.1:8000]
    ['0.381', '282', 'tiger cat']
    ['0.361', '285', 'Egyptian cat']
    ...
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.tools.client import DEFAULT_URL, ClientError, GatewayClient


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--model-name", required=True)
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args()
    try:
        body = GatewayClient(args.url).classify(Path(args.image), model=args.model_name, top_k=args.top_k)
    except (ClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for p in body["results"][0]["predictions"]:
        print([f"{p['score']:.3f}", str(p["index"]), p["label"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
