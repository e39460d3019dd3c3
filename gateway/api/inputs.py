"""Request -> list of image bytes and validated query parameters.

Accepted bodies: raw bytes (image/*, application/octet-stream or no Content-Type, as
``curl -T`` sends), multipart field(s) ``image``, or JSON ``{"image": b64}`` /
``{"images": [b64, ...]}``.  Anything else a client sent is refused by name, never dropped.
"""
from __future__ import annotations

import base64
import binascii

from flask import Request

from gateway.errors import BadRequest, UnsupportedMediaType

ROUTING_PARAMS = ("route", "backend")
# No Content-Type (curl -T) and curl --data-binary's default form type carry raw bytes too.
RAW_TYPES = ("application/octet-stream", "", "application/x-www-form-urlencoded")


def read_images(request: Request) -> list[bytes]:
    mimetype = request.mimetype or ""
    if mimetype in RAW_TYPES or mimetype.startswith("image/"):
        return [request.get_data(cache=False)]
    if mimetype == "multipart/form-data":
        return _multipart(request)
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return _json(request)
    raise UnsupportedMediaType(
        f"unsupported Content-Type {mimetype!r}: send raw image bytes (image/* or "
        "application/octet-stream), multipart/form-data with field 'image', or application/json "
        "with 'image'/'images' as base64", code="unsupported_media_type")


def _multipart(request: Request) -> list[bytes]:
    files, form = request.files, request.form
    extra = sorted(set(files) - {"image"}) + sorted(form)
    if extra:
        raise BadRequest(f"multipart field {extra[0]!r} is not accepted; send images in field 'image'",
                         code="unexpected_field")
    images = files.getlist("image")
    if not images:
        raise BadRequest("multipart body has no file in field 'image'", code="no_image")
    return [f.read() for f in images]


def _json(request: Request) -> list[bytes]:
    payload = request.get_json(silent=True, cache=False)
    if payload is None:
        raise BadRequest("request body is not valid JSON", code="invalid_json")
    if not isinstance(payload, dict):
        raise BadRequest(f"JSON body must be an object with 'image' or 'images', got {type(payload).__name__}",
                         code="invalid_json")
    extra = sorted(set(payload) - {"image", "images"})
    if extra:
        raise BadRequest(f"JSON key {extra[0]!r} is not accepted (use 'image' or 'images')",
                         code="unexpected_field")
    if ("image" in payload) == ("images" in payload):
        raise BadRequest("JSON body needs exactly one of 'image' (base64 string) or 'images' (list)",
                         code="no_image")
    if "image" in payload:
        return [_b64(payload["image"], "image")]
    items = payload["images"]
    if not isinstance(items, list):
        raise BadRequest(f"'images' must be a list of base64 strings, got {type(items).__name__}",
                         code="invalid_json")
    return [_b64(item, f"images[{i}]") for i, item in enumerate(items)]


def _b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string, got {type(value).__name__}", code="invalid_base64")
    if value.startswith("data:"):  # data URL: data:image/jpeg;base64,....
        _, sep, value = value.partition(",")
        if not sep:
            raise BadRequest(f"{where} is a data URL without a ',' before its data", code="invalid_base64")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where} is not valid base64: {exc}", code="invalid_base64") from None
    if not data:
        raise BadRequest(f"{where} is empty", code="no_image")
    return data


def read_query(request: Request, accepted: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and none unknown; ``route`` names a route,
    ``backend`` a backend (or a route, as it always could); both: that route on that backend."""
    args = request.args
    extra = sorted(set(args) - set(accepted))
    if extra:
        raise BadRequest(f"unknown query parameter {extra[0]!r} (accepted: {', '.join(accepted)})",
                         code="invalid_parameter")
    for name in accepted:
        if len(args.getlist(name)) > 1:
            raise BadRequest(f"query parameter {name!r} given more than once", code="invalid_parameter")
    for name in ("route", "backend"):
        if name in args and not args[name]:
            raise BadRequest(f"{name} must not be empty", code="invalid_parameter")
    return {name: args[name] for name in accepted if name in args}
