"""`gateway traffic MODEL`: a running gateway's split, shadows and their live agreement; changes them.

    gateway traffic efficientnet_lite0                                  # show
    gateway traffic efficientnet_lite0 --weights embedded=90,triton=10  # change the split
    gateway traffic efficientnet_lite0 --shadow triton-tf:1.0           # shadow 100% to triton-tf
    gateway traffic efficientnet_lite0 --shadow none                    # no shadows

Changes go through ``PUT /v1/models/<m>/traffic`` with the admin key (``--admin-key`` or
GATEWAY_ADMIN_KEY) when the gateway has ``server.admin_keys``; every worker applies them.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
from typing import Any

from gateway.tools.client import DEFAULT_URL, ClientError, GatewayClient


class TrafficClient(GatewayClient):
    def traffic(self, model: str) -> dict:
        return self._call("GET", f"/v1/models/{model}/traffic")

    def change_traffic(self, model: str, change: dict, admin_key: str | None = None) -> dict:
        headers = {"X-Admin-Key": admin_key} if admin_key else {}
        return self._call("PUT", f"/v1/models/{model}/traffic", json=change, headers=headers)


def parse_weights(text: str) -> dict[str, float]:
    """``route=90,other=10`` -> {"route": 90.0, "other": 10.0}."""
    weights = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--weights: expected route=number[,route=number...], got {part.strip()!r}")
    return weights


def parse_shadows(values: list[str]) -> list[dict]:
    """``["triton-tf:0.1", "torchserve:1:2.5"]`` (ROUTE:FRACTION[:TIMEOUT_S]) -> shadow entries; ``none`` -> []."""
    if [v.strip().lower() for v in values] == ["none"]:
        return []
    shadows = []
    for value in values:
        route, _, rest = value.partition(":")
        fraction, _, timeout = rest.partition(":")
        try:
            entry: dict[str, Any] = {"route": route, "fraction": float(fraction) if fraction else 1.0}
            if timeout:
                entry["timeout_s"] = float(timeout)
        except ValueError:
            raise ValueError(f"--shadow: expected ROUTE:FRACTION[:TIMEOUT_S] or none, got {value!r}") from None
        if not route:
            raise ValueError(f"--shadow: expected ROUTE:FRACTION[:TIMEOUT_S] or none, got {value!r}")
        shadows.append(entry)
    return shadows


def register(subparsers) -> None:
    p = subparsers.add_parser("traffic", help="show or change a model's traffic split and shadow routes "
                                              "on a running gateway")
    p.add_argument("model")
    p.add_argument("--url", default=DEFAULT_URL, help=f"gateway URL (default {DEFAULT_URL})")
    p.add_argument("--weights", default=None, help="route=weight[,route=weight...]: the new split (routes left "
                                                   "out get 0); 'none': no split (routes in order)")
    p.add_argument("--shadow", action="append", default=None, metavar="ROUTE:FRACTION[:TIMEOUT_S]",
                   help="a shadow route with the fraction of requests copied to it (repeat for several); "
                        "'none' stops shadowing")
    p.add_argument("--admin-key", default=os.environ.get("GATEWAY_ADMIN_KEY"), dest="admin_key",
                   help="one of the gateway's server.admin_keys (default: $GATEWAY_ADMIN_KEY)")
    p.add_argument("--api-key", default=os.environ.get("GATEWAY_API_KEY"), dest="api_key",
                   help="an API key, when the gateway has server.api_keys (default: $GATEWAY_API_KEY)")
    p.add_argument("--by", default=None, help="who makes the change, for the change log (default: your user name)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")
    p.set_defaults(func=traffic_command)


def traffic_command(args) -> int:
    client = TrafficClient(args.url, api_key=args.api_key)
    change: dict[str, Any] = {}
    try:
        if args.weights is not None:
            change["weights"] = None if args.weights.strip().lower() == "none" else parse_weights(args.weights)
        if args.shadow is not None:
            change["shadows"] = parse_shadows(args.shadow)
    except ValueError as exc:
        print(f"gateway traffic: {exc}", file=sys.stderr)
        return 2
    try:
        if change:
            change["by"] = args.by or _user()
            body = client.change_traffic(args.model, change, args.admin_key)
            print(f"changed: {body['change']['what']}")
        else:
            body = client.traffic(args.model)
    except ClientError as exc:
        print(f"gateway traffic: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else render(body))
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(body: dict) -> str:
    """The traffic endpoint's JSON as a few tables."""
    lines = [f"{body['model']}: {body['split']} (from {body['source']}; request key header {body['key_header']})"]
    routes = [r for r in body["routes"] if r["weight"] or r["answered"] or r["failed"]] or body["routes"]
    lines.append(f"  {'route':<16}{'weight':>8}{'share':>8}{'answered':>10}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"
                 "  circuit")
    for r in routes:
        weight = "-" if r["weight"] is None else f"{r['weight']:g}"
        failed = sum(r["failed"].values())
        note = "  canary" if r["canary"] else ""
        lines.append(f"  {r['name']:<16}{weight:>8}{_pct(r['share']):>8}{r['answered']:>10}{failed:>8}"
                     f"{_ms(r['latency_ms']['p50']):>9}{_ms(r['latency_ms']['p99']):>9}  {r['circuit'] or '-'}{note}")
    if not body["shadows"]:
        lines.append("shadows: none")
    else:
        lines.append("shadows:" + ("" if body["shadows_enabled"] else " (off in this deployment)"))
        lines.append(f"  {'route':<16}{'fraction':>9}{'calls':>7}{'errors':>7}{'dropped':>8}{'top-1 agr':>10}"
                     f"{'top-5 agr':>10}{'box agr':>9}{'max|diff|':>10}{'p50 ms':>8}{'ratio':>7}")
        for s in body["shadows"]:
            diff = "-" if s["max_score_diff"] is None else f"{s['max_score_diff']:.2g}"
            ratio = s["latency_ratio"]["p50"]
            name = s["route"] if s.get("active", True) else s["route"] + " (off)"
            lines.append(f"  {name:<16}{s['fraction']:>9g}{s['calls']:>7}{s['errors']:>7}{s['dropped']:>8}"
                         f"{_pct(s['top1_agreement']):>10}{_pct(s['top5_agreement']):>10}"
                         f"{_pct(s['box_agreement']):>9}{diff:>10}{_ms(s['latency_ms']['p50']):>8}"
                         f"{'-' if ratio is None else f'{ratio:.2f}':>7}")
            if s["errors_by_code"]:
                lines.append("    errors: " + ", ".join(f"{k} {v}" for k, v in s["errors_by_code"].items()))
    guard = body["guard"]
    if guard["settings"]:
        g = guard["settings"]
        rules = [f"{k} {g[k]:g}" for k in ("min_agreement", "max_error_rate") if g[k] is not None]
        tripped = "; ".join(f"{route} zeroed at {t['time']}: {t['reason']}" for route, t in guard["tripped"].items())
        lines.append(f"guard: {', '.join(rules)} over {g['window']}; canaries: {', '.join(guard['canaries']) or 'none'}"
                     f"; tripped: {tripped or 'none'}")
    else:
        lines.append("guard: none")
    if body["changes"]:
        lines.append("changes:")
        for c in body["changes"][-10:]:
            lines.append(f"  {c['time']}  {c['source']:<7} {c['who']}: {c['what']}")
    agg = body["aggregation"]
    lines.append(f"(counts since start, summed over {agg['workers']} worker process(es), {agg['live_workers']} live)")
    return "\n".join(lines)
