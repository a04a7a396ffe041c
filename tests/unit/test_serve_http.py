"""Serve's request parsing without Ray: real Starlette Requests built from an ASGI scope and a
receive callable, multipart bodies from urllib3's encoder (what `requests` sends)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request
from urllib3 import encode_multipart_formdata

from pipeline.fetch import InputPolicy
from pipeline.rows import stable_seed
from pipeline.serve.args import MAX_VARIANTS, ServeArgs
from pipeline.serve.http import ApiError, default_seed, error_response, parse_request, request_seed

LIMIT = 200_000
ARGS = ServeArgs(model_uri="unused", max_request_bytes=LIMIT, steps=3, guidance_scale=4.0, image_format="png")
CONTEXT, PRODUCT, MASK = b"\x89PNG context bytes", b"\x89PNG product bytes", b"\x89PNG mask bytes"
BBOX = "[10, 20, 90, 99]"


class Body:
    """An ASGI receive callable handing out `data` in `chunk`-byte messages; counts the calls."""

    def __init__(self, data: bytes, chunk: int = 16_384):
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
        self.calls = 0

    async def __call__(self) -> dict:
        i = self.calls
        self.calls += 1
        return {"type": "http.request", "body": self.chunks[i], "more_body": i < len(self.chunks) - 1}


def request(data: bytes, content_type: str | None, *, content_length: bool = True, chunk: int = 16_384):
    body = Body(data, chunk)
    headers = [] if content_type is None else [(b"content-type", content_type.encode())]
    if content_length:
        headers.append((b"content-length", str(len(data)).encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/render", "headers": headers, "query_string": b""}
    return Request(scope, body), body


def form(fields, **kwargs):
    """A multipart request of `fields` (a dict or a list of pairs; (filename, bytes, type) for a file)."""
    data, content_type = encode_multipart_formdata(fields)
    return request(data, content_type, **kwargs)


def files(**extra):
    fields = {"context": ("c.png", CONTEXT, "image/png"), "product": ("p.png", PRODUCT, "image/png"), "bbox": BBOX}
    return {**fields, **extra}


def parse(req, policy: InputPolicy | None = None, args: ServeArgs = ARGS):
    return asyncio.run(parse_request(req[0] if isinstance(req, tuple) else req, args, policy or InputPolicy("s3://")))


def refused(req, policy: InputPolicy | None = None, args: ServeArgs = ARGS) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(req, policy, args)
    return caught.value


# -- multipart ------------------------------------------------------------------------------------


def test_multipart_with_bbox_takes_the_defaults_of_the_args():
    parsed = parse(form(files()))
    assert (parsed.context, parsed.product, parsed.mask) == (CONTEXT, PRODUCT, None)
    assert parsed.bbox == [10.0, 20.0, 90.0, 99.0]
    assert (parsed.steps, parsed.guidance_scale, parsed.image_format) == (3, 4.0, "png")
    assert parsed.seed is None and parsed.pair_id is None
    assert parsed.variants == 1


def test_multipart_with_mask_and_every_option():
    fields = files(mask=("m.png", MASK, "image/png"), seed="42", steps=" 7 ", guidance_scale="2.5", format="webp")
    fields.pop("bbox")
    parsed = parse(form({**fields, "pair_id": "sku-1.v2=a_b"}))
    assert parsed.mask == MASK and parsed.bbox is None
    assert (parsed.seed, parsed.steps, parsed.guidance_scale, parsed.image_format) == (42, 7, 2.5, "webp")
    assert parsed.pair_id == "sku-1.v2=a_b"


def test_an_option_sent_as_a_file_part_is_read_as_text():
    parsed = parse(form(files(seed=("seed.txt", b"12\n", "text/plain"))))
    assert parsed.seed == 12


def test_variants_is_an_int_option_up_to_the_batch_job_s_limit():
    assert parse(form(files(variants=" 3 "))).variants == 3
    assert parse(form(files(variants=str(MAX_VARIANTS)))).variants == MAX_VARIANTS
    assert parse(form(files(variants=""))).variants == 1  # an unfilled form field: the default
    capped = ARGS.model_copy(update={"max_variants": 4})
    error = refused(form(files(variants="5")), args=capped)
    assert (error.status, error.code) == (400, "bad_option") and "variants must be an integer in 1..4" in error.message


def test_the_variants_limit_is_the_batch_job_s():
    from pydantic import ValidationError

    from pipeline.config import ConfigError, RenderConfig

    RenderConfig(manifest="m", output="o", model="x", variants=MAX_VARIANTS).check()
    with pytest.raises(ConfigError, match="--variants"):
        RenderConfig(manifest="m", output="o", model="x", variants=MAX_VARIANTS + 1).check()
    with pytest.raises(ValidationError, match="max_variants"):
        ServeArgs(model_uri="m", max_variants=MAX_VARIANTS + 1)


@pytest.mark.parametrize("name", ["context", "product"])
def test_a_missing_file_is_named(name):
    fields = files()
    fields.pop(name)
    error = refused(form(fields))
    assert (error.status, error.code) == (400, "missing_file")
    assert repr(name) in error.message


def test_an_image_sent_as_a_text_field_is_not_a_file():
    error = refused(form(files(context="not a file part")))
    assert (error.status, error.code) == (400, "missing_file")
    assert "curl -F context=@FILE" in error.message


def test_unknown_and_duplicate_fields():
    error = refused(form(files(colour="red")))
    assert (error.code, "'colour'" in error.message) == ("unknown_field", True)
    duplicated = [*files().items(), ("seed", "1"), ("seed", "2")]
    assert refused(form(duplicated)).code == "duplicate_field"
    two_contexts = [*files().items(), ("context", ("c2.png", CONTEXT, "image/png"))]
    error = refused(form(two_contexts))
    assert (error.code, "'context'" in error.message) == ("duplicate_field", True)


@pytest.mark.parametrize(
    "fields, code",
    [
        (files(bbox="[1, 2"), "bad_bbox"),  # not JSON
        (files(bbox="[1, 2, 3]"), "bad_bbox"),
        (files(bbox="[90, 20, 10, 99]"), "bad_bbox"),  # inverted
        (files(bbox="[-1, 20, 10, 99]"), "bad_bbox"),
        (files(bbox='["a", 2, 3, 4]'), "bad_bbox"),
        (files(mask=("m.png", MASK, "image/png")), "region_ambiguous"),
        ({"context": ("c.png", CONTEXT), "product": ("p.png", PRODUCT)}, "region_missing"),
    ],
)
def test_bad_regions(fields, code):
    error = refused(form(fields))
    assert (error.status, error.code) == (400, code)
    assert error.message


@pytest.mark.parametrize(
    "option, value",
    [
        ("steps", "0"),
        ("steps", "101"),  # above max_steps
        ("steps", "two"),
        ("steps", "2.5"),
        ("seed", "-1"),
        ("seed", str(2**63)),
        ("guidance_scale", "nan"),
        ("guidance_scale", "51"),
        ("guidance_scale", "lots"),
        ("format", "gif"),
        ("variants", "0"),
        ("variants", "17"),  # above the batch job's limit of 16
        ("variants", "three"),
        ("variants", "2.5"),
    ],
)
def test_bad_options(option, value):
    error = refused(form(files(**{option: value})))
    assert (error.status, error.code) == (400, "bad_option")
    assert option in error.message


@pytest.mark.parametrize("pair_id", ["sku-1\n", "a/b", "..", ".hidden", "", "sku 1", "x" * 201, "é"])
def test_a_pair_id_breaking_the_name_rule_is_refused_as_sent(pair_id):
    error = refused(form(files(pair_id=pair_id)))
    assert (error.status, error.code) == (400, "invalid_pair_id")
    assert "pair_id" in error.message


@pytest.mark.parametrize(
    "data, content_type, why",
    [
        (b"garbage", "multipart/form-data; boundary=xyz", "no delimiter"),
        (encode_multipart_formdata(files())[0], "multipart/form-data", "no boundary parameter"),
        (
            b"--xyz\r\nContent-Disposition: form-data\r\n\r\nv\r\n--xyz--\r\n",
            "multipart/form-data; boundary=xyz",
            "no name",
        ),
        (b"", "multipart/form-data; boundary=xyz", "empty body"),
    ],
)
def test_malformed_multipart(data, content_type, why):
    error = refused(request(data, content_type))
    assert (error.status, error.code) == (400, "bad_multipart"), why


def test_a_body_cut_short_is_malformed_not_a_missing_part():
    data, content_type = encode_multipart_formdata([*files().items(), ("seed", "5")])
    error = refused(request(data[: len(data) - 20], content_type))
    assert error.code == "bad_multipart" and "closing boundary" in error.message


def test_a_flood_of_parts_or_a_huge_text_field_stops_the_parse():
    flood = [*files().items(), *((f"f{i}", "x") for i in range(20))]
    assert refused(form(flood)).code == "bad_multipart"
    assert refused(form(files(bbox="[" + " " * 70_000 + "1, 2, 3, 4]"))).code == "bad_multipart"


# -- the body limit ---------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    req, body = form(files(context=("c.png", b"\0" * (LIMIT + 1), "image/png")))
    error = refused(req)
    assert (error.status, error.code) == (413, "body_too_large")
    assert body.calls == 0


def test_a_streamed_body_over_the_limit_stops_the_parse_where_it_passes_the_limit():
    # chunked (no Content-Length), 10 KB messages, 5x the limit: the parser must not drain it
    data, content_type = encode_multipart_formdata(files(context=("c.png", b"\0" * (5 * LIMIT), "image/png")))
    req, body = request(data, content_type, content_length=False, chunk=10_000)
    error = refused(req)
    assert (error.status, error.code) == (413, "body_too_large")
    assert body.calls == LIMIT // 10_000 + 1  # the message that passed the limit was the last one read
    assert body.calls < len(body.chunks) // 4


def test_a_streamed_json_body_over_the_limit_is_refused():
    req, body = request(b" " * (3 * LIMIT), "application/json", content_length=False, chunk=10_000)
    assert refused(req).code == "body_too_large"
    assert body.calls < len(body.chunks)


def test_a_body_at_the_limit_passes_and_a_bad_length_header_is_refused():
    data, content_type = encode_multipart_formdata(files())
    padded = files(context=("c.png", b"\0" * (LIMIT - len(data) - 1), "image/png"))
    data, content_type = encode_multipart_formdata(padded)
    assert len(data) <= LIMIT
    assert parse(request(data, content_type, content_length=False, chunk=7_000)).context == padded["context"][1]
    req, _ = request(b"{}", "application/json", content_length=False)
    req.scope["headers"].append((b"content-length", b"12abc"))
    assert refused(req).code == "bad_request"


def test_an_unsupported_media_type_is_refused_unread():
    req, body = request(b"context=x", "application/x-www-form-urlencoded")
    error = refused(req)
    assert (error.status, error.code) == (400, "unsupported_media_type")
    assert body.calls == 0
    assert refused(request(b"{}", None)).code == "unsupported_media_type"


# -- JSON -----------------------------------------------------------------------------------------


def json_request(document, **kwargs):
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    return request(data, "application/json", **kwargs)


def test_json_request_names_uris_under_the_allowlist(tmp_path):
    policy = InputPolicy("s3://", (str(tmp_path),))
    document = {"context_uri": str(tmp_path / "c.png"), "product_uri": "s3://bucket/p.png", "bbox": [1, 2, 30, 40]}
    parsed = parse(json_request({**document, "pair_id": "sku-9", "steps": 5}), policy)
    assert (parsed.context, parsed.product, parsed.mask) == (str(tmp_path / "c.png"), "s3://bucket/p.png", None)
    assert (parsed.bbox, parsed.pair_id, parsed.steps, parsed.seed) == ([1.0, 2.0, 30.0, 40.0], "sku-9", 5, None)
    assert parse(json_request({**document, "variants": 4}), policy).variants == 4
    masked = {**document, "mask_uri": str(tmp_path / "m.png")}
    masked.pop("bbox")
    assert parse(json_request(masked), policy).mask == str(tmp_path / "m.png")


@pytest.mark.parametrize(
    "document, status, code",
    [
        (b"{not json", 400, "bad_json"),
        (b"\xff\xfe", 400, "bad_json"),
        ([1, 2], 400, "bad_json"),
        ({"context_uri": "s3://b/c", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40], "x": 1}, 400, "unknown_field"),
        ({"product_uri": "s3://b/p", "bbox": [1, 2, 30, 40]}, 400, "missing_uri"),
        ({"context_uri": 5, "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40]}, 400, "missing_uri"),
        (
            {"context_uri": "file:///etc/passwd", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40]},
            400,
            "uri_not_allowed",
        ),
        (
            {"context_uri": "http://169.254.169.254/", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40]},
            400,
            "uri_not_allowed",
        ),
        ({"context_uri": "s3://b/c", "product_uri": "s3://b/p", "bbox": "[1, 2"}, 400, "bad_bbox"),
        ({"context_uri": "s3://b/c", "product_uri": "s3://b/p"}, 400, "region_missing"),
        (
            {"context_uri": "s3://b/c", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40], "steps": True},
            400,
            "bad_option",
        ),
        *(
            (
                {"context_uri": "s3://b/c", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40], "variants": v},
                400,
                "bad_option",
            )
            for v in (0, 17, 2.5, "three", True)
        ),
        (
            {"context_uri": "s3://b/c", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40], "pair_id": 7},
            400,
            "invalid_pair_id",
        ),
        (
            {"context_uri": "s3://b/c", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40], "pair_id": "a\n"},
            400,
            "invalid_pair_id",
        ),
    ],
)
def test_bad_json_requests(document, status, code):
    error = refused(json_request(document))
    assert (error.status, error.code) == (status, code)


# -- seeds and error bodies -------------------------------------------------------------------------


def test_seed_is_the_request_s_then_the_pair_id_s_then_the_content_s():
    sources = (CONTEXT, PRODUCT, None)
    by_pair = parse(form(files(pair_id="sku-7")))
    assert request_seed(by_pair, sources) == stable_seed("sku-7")  # the batch job's default for that pair
    assert request_seed(parse(form(files(pair_id="sku-7", seed="9"))), sources) == 9
    by_content = parse(form(files()))
    assert request_seed(by_content, sources) == default_seed(CONTEXT, PRODUCT, None, [10, 20, 90, 99])
    assert default_seed(CONTEXT, PRODUCT, None, [10, 20, 90, 99]) == default_seed(
        CONTEXT, PRODUCT, None, [10.0, 20, 90, 99]
    )
    assert default_seed(CONTEXT, PRODUCT, MASK, None) != default_seed(CONTEXT, PRODUCT, None, [10, 20, 90, 99])


def test_error_response_is_json_with_the_code():
    response = error_response(ApiError(401, "unauthorized", "send a token"))
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert json.loads(response.body) == {"code": "unauthorized", "message": "send a token"}
    assert "www-authenticate" not in error_response(ApiError(413, "body_too_large", "big")).headers


def test_a_refused_uri_names_serves_own_arguments_not_the_batch_flags(tmp_path):
    """Serve has no --allow-root: its refusals name allow_roots= and allow_http=true."""
    policy = ServeArgs(model_uri="m", allow_roots=[str(tmp_path)]).input_policy()
    outside = {"context_uri": "/etc/passwd", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40]}
    error = refused(json_request(outside), policy)
    assert error.code == "uri_not_allowed" and "allow_roots=" in error.message and "--allow" not in error.message
    http = {"context_uri": "http://example.com/a.png", "product_uri": "s3://b/p", "bbox": [1, 2, 30, 40]}
    error = refused(json_request(http), policy)
    assert "allow_http=true" in error.message and "--allow" not in error.message
    inside = tmp_path / "c.png"
    assert parse(json_request({**outside, "context_uri": str(inside)}), policy).context == str(inside)
