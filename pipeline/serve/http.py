"""HTTP side of the Serve app: a Starlette `Request` in, a `RenderRequest` or an `ApiError` out.

    parsed = await parse_request(request, args, policy)   # ApiError(status, code, message) if bad
    return error_response(e)                              # {"code": ..., "message": ...}

No Ray and no torch here: the functions run on a hand-built Request (tests/unit/test_serve_http.py).
Multipart bodies are parsed by Starlette's `request.form()` (python-multipart) while
`BoundedReceive` counts the bytes arriving on the ASGI channel, so a body over
`max_request_bytes` stops the parse where it passes the limit (413) and is never held whole.
URIs of JSON requests are checked against the allowlist here, before anything is fetched; the
images themselves are read, decoded and checked later, by `stages.prepare_stage.prepare_pair`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive

from pipeline.config import RenderConfig
from pipeline.fetch import InputPolicy
from pipeline.options import bounds
from pipeline.rows import stable_seed
from pipeline.schema import IMAGE_FORMATS, MEDIA_TYPES, RowError, name_problem, parse_bbox
from pipeline.serve.args import RENDER_DEFAULTS, ServeArgs

__all__ = [
    "ApiError",
    "RenderRequest",
    "BoundedReceive",
    "parse_request",
    "request_seed",
    "default_seed",
    "error_response",
]

CONTENT_TYPES = MEDIA_TYPES  # format -> the answer's Content-Type
FILE_FIELDS = ("context", "product", "mask")
OPTION_FIELDS = ("bbox", "pair_id", "seed", "steps", "guidance_scale", "variants", "format")
MULTIPART_FIELDS = (*FILE_FIELDS, *OPTION_FIELDS)
JSON_FIELDS = ("context_uri", "product_uri", "mask_uri", *OPTION_FIELDS)
MAX_SEED = 2**63 - 1  # int64, as the manifest's seed column
# A plain (non-file) form field holds an option of a few bytes; images come as file parts, which
# only the body limit bounds (Starlette spools them to a temp file past 1 MiB).
MAX_FIELD_BYTES = 64 * 1024
# a request's steps, guidance and variants: the batch job's declared ranges (Serve caps steps and variants lower)
STEPS, GUIDANCE, VARIANTS = (bounds(RenderConfig, name) for name in ("steps", "guidance_scale", "variants"))
# The body's last bytes kept for the closing-boundary check: a boundary is at most 70 characters
# (RFC 2046), so its close delimiter and a trailing CRLF fit with room to spare.
TAIL_BYTES = 256
# Row-error codes that are not the client's fault, or not a plain 400.
STATUS_OF_CODE = {"too_large": 413, "fetch_failed": 502}


class ApiError(Exception):
    """A request that gets a JSON error answer instead of an image."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @classmethod
    def from_row_error(cls, error: RowError) -> ApiError:
        return cls(STATUS_OF_CODE.get(error.code, 400), error.code, error.message)


@dataclass
class RenderRequest:
    """A parsed request: each input as its uploaded bytes or as a URI (what `prepare_pair` takes)."""

    context: bytes | str
    product: bytes | str
    mask: bytes | str | None  # None: the bbox is the region
    bbox: list[float] | None
    pair_id: str | None  # names the pair: its default seed is the batch job's, stable_seed(pair_id)
    seed: int | None  # None: see request_seed
    steps: int
    guidance_scale: float
    image_format: str
    variants: int = 1  # renders with seeds rows.variant_seeds(seed, variants); the best is answered


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse({"code": error.code, "message": error.message}, status_code=error.status, headers=headers)


# -- seeds ----------------------------------------------------------------------------------------


def request_seed(request: RenderRequest, sources: tuple[bytes, bytes, bytes | None]) -> int:
    """The request's `seed`; else, with a `pair_id`, the batch job's default seed for that pair;
    else a hash of the content read (`sources`: context, product, mask bytes)."""
    if request.seed is not None:
        return request.seed
    if request.pair_id is not None:
        return stable_seed(request.pair_id)
    return default_seed(*sources, request.bbox)


def default_seed(context: bytes, product: bytes, mask: bytes | None, bbox: list[float] | None) -> int:
    """stable_seed of a sha256 over the inputs' content (length-prefixed, so parts cannot
    run into each other). A bbox counts as its float values: "[10, 20, 90, 99]" and
    "[10.0, 20, 90, 99]" are the same request."""
    region = b"mask" + mask if mask is not None else b"bbox" + json.dumps([float(v) for v in bbox]).encode()
    digest = hashlib.sha256()
    for part in (context, product, region):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return stable_seed(digest.hexdigest())


# -- the body ---------------------------------------------------------------------------------------


class BoundedReceive:
    """A request's ASGI receive channel that counts body bytes and raises 413 `body_too_large`
    once they pass `limit`: whoever is reading (Starlette's form parser, a JSON read) stops
    there, with the rest of the body never received. Keeps the body's last TAIL_BYTES."""

    def __init__(self, receive: Receive, limit: int):
        self.receive, self.limit = receive, limit
        self.size, self.tail = 0, b""

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.size += len(body)
            if self.size > self.limit:
                raise ApiError(413, "body_too_large", f"body is over the limit of {self.limit} bytes")
            self.tail = (self.tail + body[-TAIL_BYTES:])[-TAIL_BYTES:]
        return message


def _check_declared_length(request: Request, limit: int) -> None:
    """Refuse from Content-Length, before reading anything, a body known to be too big."""
    declared = request.headers.get("content-length")
    if declared is None:  # chunked: BoundedReceive stops it while it streams
        return
    if not declared.strip().isdigit():
        raise ApiError(400, "bad_request", f"Content-Length {declared!r} is not a number")
    if int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body of {int(declared)} bytes is over the limit of {limit}")


async def _read_json(request: Request, limit: int) -> dict:
    receive = BoundedReceive(request.receive, limit)
    body = b"".join([chunk async for chunk in Request(request.scope, receive).stream()])
    try:
        raw = json.loads(body)
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "bad_json", f"body is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ApiError(400, "bad_json", f"body must be a JSON object, got {type(raw).__name__}")
    return raw


async def _read_form(request: Request, limit: int) -> dict[str, bytes | str]:
    """multipart/form-data -> {field name: bytes of a file part | text of a plain field}.

    Starlette parses; at most as many file and plain parts as there are fields, so one unknown
    or repeated part gets its own code and a flood of them is `bad_multipart` at once."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    receive = BoundedReceive(request.receive, limit)
    count = len(MULTIPART_FIELDS)
    try:
        form = await Request(request.scope, receive).form(
            max_files=count, max_fields=count, max_part_size=MAX_FIELD_BYTES
        )
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", e.message) from e
    except HTTPException as e:  # the same, when the scope carries a Starlette app
        raise ApiError(400, "bad_multipart", e.detail) from e
    try:
        # python-multipart takes a body cut short as ending there, silently dropping the cut part
        if b"--" + boundary + b"--" not in receive.tail:
            raise ApiError(400, "bad_multipart", "multipart body does not end with its closing boundary")
        fields: dict[str, bytes | str] = {}
        for name, value in form.multi_items():
            if name not in MULTIPART_FIELDS:
                raise ApiError(
                    400, "unknown_field", f"unknown field {name!r}; expected some of {list(MULTIPART_FIELDS)}"
                )
            if name in fields:
                raise ApiError(400, "duplicate_field", f"field {name!r} appears more than once")
            fields[name] = await value.read() if isinstance(value, UploadFile) else value
        return fields
    finally:
        await form.close()


# -- options ----------------------------------------------------------------------------------------


def _text(value: bytes | str, name: str) -> str:
    """A form option's text: a plain field's, or an option sent as a file part (curl -F seed=@f)."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "bad_option", f"field {name!r} is not UTF-8 text") from e


def _int_option(value, name: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError as e:
            raise ApiError(400, "bad_option", f"{name} must be an integer, got {value!r}") from e
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "bad_option", f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _float_option(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not low <= number <= high:  # NaN fails too
        raise ApiError(400, "bad_option", f"{name} must be a number in {low}..{high}, got {value!r}")
    return number


def _pair_id(value) -> str | None:
    """None when not sent; else it must obey the manifest's name rule, as is (a trailing
    newline is not stripped: "sku1\\n" is refused, not taken for "sku1")."""
    if value is None:
        return None
    problem = name_problem("pair_id", value)
    if problem:
        raise ApiError(400, "invalid_pair_id", problem)
    return value


def _options(raw: dict, args: ServeArgs, has_mask: bool) -> dict:
    """Region and options shared by both request kinds; `raw` holds form text or JSON values.
    An empty option (an HTML form's unfilled field) is the default, except pair_id."""
    if has_mask and raw.get("bbox") is not None:
        raise ApiError(400, "region_ambiguous", "send a mask or a bbox, not both")
    if not has_mask and raw.get("bbox") is None:
        raise ApiError(400, "region_missing", "no region: send a mask or a bbox [x0, y0, x1, y1]")
    bbox = None
    if not has_mask:
        bbox, problem = parse_bbox(raw["bbox"])  # region_from_bbox checks it against the photo later
        if problem:
            raise ApiError(400, "bad_bbox", problem)
    image_format = raw.get("format") or args.image_format
    if image_format not in IMAGE_FORMATS:
        raise ApiError(400, "bad_option", f"format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    seed, steps, guidance, variants = (raw.get(name) for name in ("seed", "steps", "guidance_scale", "variants"))
    return {
        "bbox": bbox,
        "pair_id": _pair_id(raw.get("pair_id")),
        "seed": None if seed in (None, "") else _int_option(seed, "seed", 0, MAX_SEED),
        "steps": args.steps if steps in (None, "") else _int_option(steps, "steps", STEPS["ge"], args.max_steps),
        "guidance_scale": (
            args.guidance_scale
            if guidance in (None, "")
            else _float_option(guidance, "guidance_scale", GUIDANCE["ge"], GUIDANCE["le"])
        ),
        "image_format": image_format,
        "variants": RENDER_DEFAULTS.variants
        if variants in (None, "")
        else _int_option(variants, "variants", VARIANTS["ge"], args.max_variants),
    }


# -- the two request kinds ------------------------------------------------------------------------


async def parse_request(request: Request, args: ServeArgs, policy: InputPolicy) -> RenderRequest:
    """A POST /v1/render -> RenderRequest, or ApiError naming what is wrong."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in ("multipart/form-data", "application/json"):
        raise ApiError(
            400,
            "unsupported_media_type",
            f"Content-Type must be multipart/form-data or application/json, got {media_type or 'none'!r}",
        )
    _check_declared_length(request, args.max_request_bytes)
    if media_type == "multipart/form-data":
        return _from_form(await _read_form(request, args.max_request_bytes), args)
    return _from_json(await _read_json(request, args.max_request_bytes), args, policy)


def _from_form(fields: dict[str, bytes | str], args: ServeArgs) -> RenderRequest:
    for name in FILE_FIELDS:
        value = fields.get(name)
        if name != "mask" and value is None:
            raise ApiError(400, "missing_file", f"multipart field {name!r} (a file) is missing")
        if isinstance(value, str):
            raise ApiError(
                400,
                "missing_file",
                f"multipart field {name!r} is a text field, not a file: send it with a filename "
                f'(Content-Disposition: form-data; name="{name}"; filename="..."), as curl -F {name}=@FILE does',
            )
    raw = {name: _text(fields[name], name) for name in OPTION_FIELDS if name in fields}
    raw = {name: value if name == "pair_id" else value.strip() for name, value in raw.items()}
    options = _options(raw, args, has_mask="mask" in fields)
    return RenderRequest(fields["context"], fields["product"], fields.get("mask"), **options)


def _from_json(raw: dict, args: ServeArgs, policy: InputPolicy) -> RenderRequest:
    unknown = sorted(set(raw) - set(JSON_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown fields {unknown}; expected some of {list(JSON_FIELDS)}")
    uris = {}
    for name in ("context_uri", "product_uri", "mask_uri"):
        value = raw.get(name)
        if name == "mask_uri" and value in (None, ""):  # optional: the bbox names the region instead
            continue
        if not isinstance(value, str) or not value:
            raise ApiError(400, "missing_uri", f"{name} must be a non-empty string, got {value!r}")
        try:
            policy.check(value)
        except RowError as e:
            raise ApiError.from_row_error(e) from e
        uris[name] = value
    options = _options(raw, args, has_mask="mask_uri" in uris)
    return RenderRequest(uris["context_uri"], uris["product_uri"], uris.get("mask_uri"), **options)
