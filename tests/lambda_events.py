"""Lambda events as AWS documents them, for one HTTP request: API Gateway REST (payload 1.0),
HTTP API (payload 2.0), a function URL (2.0 shape) and an ALB target (with and without
multi-value headers). Each builder takes the same request, so one test runs on every kind.

References: the "Input format of a Lambda function for proxy integration" (REST), "Working
with AWS Lambda proxy integrations for HTTP APIs" (2.0), "Lambda function URLs: request
payload" and "Using Lambda functions as targets of an Application Load Balancer" pages.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from urllib.parse import quote

BINARY_TYPES = ("image/", "application/octet-stream")


@dataclass
class Request:
    method: str
    path: str
    body: bytes | str | None = None
    content_type: str | None = None
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, list[str]] = field(default_factory=dict)  # extra, multi-valued
    cookies: list[str] = field(default_factory=list)

    def all_headers(self) -> dict[str, list[str]]:
        headers = {"Host": ["abc123.execute-api.us-east-1.amazonaws.com"], "User-Agent": ["curl/8.5.0"],
                   "Accept": ["*/*"], "X-Forwarded-For": ["203.0.113.7"], "X-Forwarded-Proto": ["https"],
                   "X-Forwarded-Port": ["443"]}
        if self.content_type:
            headers["Content-Type"] = [self.content_type]
        if self.cookies:
            headers["Cookie"] = ["; ".join(self.cookies)]
        headers.update(self.headers)
        return headers

    def encoded_body(self) -> tuple[str | None, bool]:
        """(body, isBase64Encoded) as the service passes it: binary media base64, text as is."""
        if self.body is None:
            return None, False
        if isinstance(self.body, bytes) and (self.content_type or "").startswith(BINARY_TYPES):
            return base64.b64encode(self.body).decode(), True
        text = self.body.decode() if isinstance(self.body, bytes) else self.body
        return text, False


def rest_v1(req: Request) -> dict:
    """API Gateway REST API, Lambda proxy integration (payload 1.0), stage ``prod``, ``/{proxy+}``."""
    headers = req.all_headers()
    body, b64 = req.encoded_body()
    return {
        "resource": "/{proxy+}",
        "path": req.path,
        "httpMethod": req.method,
        "headers": {k: v[-1] for k, v in headers.items()},
        "multiValueHeaders": headers,
        "queryStringParameters": {k: v[-1] for k, v in req.query.items()} or None,
        "multiValueQueryStringParameters": dict(req.query) or None,
        "pathParameters": {"proxy": req.path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc123", "resourceId": "xyz789", "stage": "prod",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef", "resourcePath": "/{proxy+}",
            "httpMethod": req.method, "path": f"/prod{req.path}", "protocol": "HTTP/1.1",
            "requestTime": "09/Apr/2015:12:34:56 +0000", "requestTimeEpoch": 1428582896000,
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "identity": {"sourceIp": "203.0.113.7", "userAgent": "curl/8.5.0", "cognitoIdentityId": None,
                         "caller": None, "user": None, "userArn": None, "accessKey": None},
        },
        "body": body,
        "isBase64Encoded": b64,
    }


def _v2(req: Request, domain: str, route_key: str, stage: str) -> dict:
    headers = {k.lower(): ",".join(v) for k, v in req.all_headers().items() if k.lower() != "cookie"}
    body, b64 = req.encoded_body()
    raw_query = "&".join(f"{quote(k)}={quote(v)}" for k, values in req.query.items() for v in values)
    event = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": req.path,
        "rawQueryString": raw_query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012", "apiId": domain.split(".")[0], "domainName": domain,
            "domainPrefix": domain.split(".")[0], "requestId": "JKJaXmPLvHcESHA=", "routeKey": route_key,
            "stage": stage, "time": "10/Mar/2024:12:00:00 +0000", "timeEpoch": 1710072000000,
            "http": {"method": req.method, "path": req.path, "protocol": "HTTP/1.1",
                     "sourceIp": "203.0.113.7", "userAgent": "curl/8.5.0"},
        },
        "isBase64Encoded": b64,
    }
    if req.cookies:
        event["cookies"] = list(req.cookies)
    if req.query:
        event["queryStringParameters"] = {k: ",".join(v) for k, v in req.query.items()}
    if body is not None:
        event["body"] = body
    return event


def http_v2(req: Request) -> dict:
    """API Gateway HTTP API (payload 2.0), ``$default`` route and stage."""
    event = _v2(req, "abc123.execute-api.us-east-1.amazonaws.com", "$default", "$default")
    event["pathParameters"] = {"proxy": req.path.lstrip("/")}
    event["stageVariables"] = None
    return event


def function_url(req: Request) -> dict:
    """A Lambda function URL (the 2.0 shape; no stage variables or path parameters)."""
    event = _v2(req, "a1b2c3d4e5f6g7h8i9j0.lambda-url.us-east-1.on.aws", "$default", "$default")
    event["requestContext"]["authorizer"] = None
    return event


def _alb(req: Request, multi: bool) -> dict:
    headers = {k.lower(): v for k, v in req.all_headers().items()}
    body, b64 = req.encoded_body()
    # ALB passes query strings percent-encoded as the client sent them
    query = {quote(k): [quote(v) for v in values] for k, values in req.query.items()}
    event = {
        "requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:"
                                                      "targetgroup/gateway/73e2d6bc24d8a067"}},
        "httpMethod": req.method,
        "path": req.path,
        "body": body or "",
        "isBase64Encoded": b64,
    }
    if multi:
        event["multiValueQueryStringParameters"] = query
        event["multiValueHeaders"] = headers
    else:
        event["queryStringParameters"] = {k: v[-1] for k, v in query.items()}
        event["headers"] = {k: v[-1] for k, v in headers.items()}
    return event


def alb(req: Request) -> dict:
    return _alb(req, multi=False)


def alb_multi(req: Request) -> dict:
    """An ALB target group with multi-value headers turned on."""
    return _alb(req, multi=True)


KINDS = {"rest_v1": rest_v1, "http_v2": http_v2, "function_url": function_url, "alb": alb,
         "alb_multi": alb_multi}


def response_headers(response: dict) -> dict[str, str]:
    """Lower-cased headers of a Lambda proxy response, whichever shape it came in."""
    if "multiValueHeaders" in response:
        return {k.lower(): v[-1] for k, v in response["multiValueHeaders"].items()}
    return {k.lower(): v for k, v in response.get("headers", {}).items()}


def response_body(response: dict) -> bytes:
    body = response.get("body", "")
    return base64.b64decode(body) if response.get("isBase64Encoded") else body.encode()
