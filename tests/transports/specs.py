"""Check captured HTTP requests against the providers' own API documents (issue 13, item 9).

The documents live in ``provider_specs/`` beside this file, each naming its
source in ``$comment``: OpenAPI 3.1 (Resend, SendGrid, Mailgun), Swagger 2.0
(Postmark), botocore's service model (SES v2 ``SendEmail``) and JSON Schemas
transcribed from the official SDKs where the provider publishes none (Mailjet,
Nylas; their ``x-endpoint`` gives method, path, Content-Type and auth).

:func:`violations` reads one :class:`~tests.transports.fakeapi.Captured`
request and returns what in it the document does not allow, as readable lines:
an operation that does not exist, a missing required header or the wrong auth
scheme, a Content-Type the operation does not accept, and the body against the
operation's schema (JSON bodies; multipart form fields mapped to the form
schema's properties; SES's JSON against the SendEmail input shape, blobs
base64-decoded). An empty list means the request conforms.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import getaddresses
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from botocore.model import ServiceModel, Shape
from botocore.validate import ParamValidator
from jsonschema import Draft4Validator, Draft202012Validator, FormatChecker
from jsonschema.protocols import Validator
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource, Specification
from referencing.jsonschema import DRAFT4, DRAFT202012

from tests.transports.fakeapi import Captured

SPECS = Path(__file__).with_name("provider_specs")
DOCUMENTS = {
    "postmark": "postmark.swagger.json",
    "resend": "resend.openapi.json",
    "sendgrid": "sendgrid.openapi.json",
    "mailgun": "mailgun.openapi.json",
    "ses": "sesv2.sendemail.service.json",
    "mailjet": "mailjet.sdk-schema.json",
    "nylas": "nylas.sdk-schema.json",
}
ROOT = "urn:provider-spec"  # the base URI each document is registered under, so "#/…" refs resolve in it
# Mailgun's operation text: "Send options (parameters starting with o:, h:, v:, or t:) are
# limited to 16KB total"
MAILGUN_OPTIONS_LIMIT = 16 * 1024
MAILGUN_BODY_FIELDS = ("text", "html", "amp-html", "template")  # "you must provide one of the following"
SPEC_SUMMARY: list[dict[str, Any]] = []  # one line per provider, printed at the end of the run


@cache
def document(provider: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SPECS / DOCUMENTS[provider]).read_text(encoding="utf-8"))
    return document


def violations(provider: str, request: Captured) -> list[str]:
    """What in ``request`` the provider's document does not allow; [] when it conforms.

    Besides the schema, the rules the document states only in prose (see :data:`PROSE`).
    """
    check = {
        "postmark": _swagger2,
        "resend": _openapi31,
        "sendgrid": _openapi31,
        "mailgun": _openapi31,
        "ses": _botocore,
        "mailjet": _sdk_schema,
        "nylas": _sdk_schema,
    }[provider]
    problems = check(document(provider), request)
    if provider in PROSE:
        body = _body(request)
        problems += PROSE[provider](body) if body is not None else []
    return problems


def _body(request: Captured) -> Any:
    """The body as data: JSON's value, a form's fields (name -> values); None if it does not parse."""
    if _media_type(request) == "multipart/form-data":
        try:
            return _fields(request)
        except ValueError:
            return None
    return _json(request)[0]


# -- rules the documents state in their descriptions, not in the schema ------------------

# SendGrid's "headers" (mail and personalization): "You may not override the following headers"
SENDGRID_RESERVED = frozenset(
    h.lower()
    for h in [
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    ]
)
SENDGRID_BYTES = 10_000  # substitutions and custom_args: "may not exceed 10,000 bytes per personalization"
POSTMARK_MAX_ADDRESSES = 50  # To, Cc, Bcc: "Multiple addresses are comma seperated. Max 50."


def _sendgrid_prose(body: Any) -> list[str]:
    problems = []
    if not isinstance(body, dict):
        return []
    if "reply_to" in body and "reply_to_list" in body:
        problems.append("reply_to and reply_to_list together (the document: 'but not both')")
    blocks = [
        ("body", body),
        *((f"personalizations/{i}", p) for i, p in enumerate(body.get("personalizations", []))),
    ]
    for where, block in blocks:
        reserved = SENDGRID_RESERVED.intersection(h.lower() for h in block.get("headers", {}))
        if reserved:
            problems.append(f"{where}/headers overrides reserved headers {sorted(reserved)}")
        for name in ("substitutions", "custom_args"):
            value = block.get(name)
            size = len(json.dumps(value, ensure_ascii=False).encode()) if isinstance(value, dict) else 0
            if size > SENDGRID_BYTES:
                problems.append(f"{where}/{name} is {size} bytes, over {SENDGRID_BYTES}")
    return problems


def _postmark_prose(body: Any) -> list[str]:
    problems = []
    for index, message in enumerate(body if isinstance(body, list) else []):
        for field in ("To", "Cc", "Bcc"):
            value = message.get(field) if isinstance(message, dict) else None
            if isinstance(value, str) and len(getaddresses([value])) > POSTMARK_MAX_ADDRESSES:
                problems.append(f"body/{index}/{field}: more than {POSTMARK_MAX_ADDRESSES} addresses")
    return problems


def _mailgun_prose(fields: Any) -> list[str]:
    problems = []
    if not any(name in fields for name in MAILGUN_BODY_FIELDS):
        problems.append(f"none of {', '.join(MAILGUN_BODY_FIELDS)} (the operation needs one)")
    options = sum(
        len(name.encode()) + len(value.encode())
        for name, values in fields.items()
        for value in values
        if name[:2] in {"o:", "h:", "v:", "t:"}
    )
    if options > MAILGUN_OPTIONS_LIMIT:
        problems.append(f"o:/h:/v:/t: options total {options} bytes, over the 16KB limit")
    return problems


PROSE: dict[str, Callable[[Any], list[str]]] = {
    "sendgrid": _sendgrid_prose,
    "postmark": _postmark_prose,
    "mailgun": _mailgun_prose,
}


# -- the request's parts ---------------------------------------------------------


def _header(request: Captured, name: str) -> str | None:
    for key, value in request.headers:
        if key.lower() == name.lower():
            return value
    return None


def _media_type(request: Captured) -> str:
    return (_header(request, "Content-Type") or "").split(";")[0].strip().lower()


def _path(request: Captured) -> str:
    return request.path.split("?")[0]


def _match(template: str, path: str) -> dict[str, str] | None:
    """The path parameters if ``path`` fits ``template`` (``/v3/{domain_name}/messages``)."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    found = re.fullmatch(pattern, path)
    return {k: unquote(v) for k, v in found.groupdict().items()} if found else None


def _json(request: Captured) -> tuple[Any, list[str]]:
    try:
        return json.loads(request.body), []
    except ValueError as err:
        return None, [f"body is not JSON ({err})"]


def _auth(request: Captured, scheme: str) -> list[str]:
    """``Authorization`` in ``scheme`` (bearer, basic), with a well-formed credential."""
    value = _header(request, "Authorization") or ""
    kind, _, credential = value.partition(" ")
    if kind.lower() != scheme or not credential:
        return [f"Authorization is not {scheme} ({kind or 'absent'})"]
    if scheme == "basic":
        try:
            if ":" not in base64.b64decode(credential, validate=True).decode():
                return ["Authorization basic credential has no user:password"]
        except (binascii.Error, UnicodeDecodeError):
            return ["Authorization basic credential is not base64"]
    return []


def _schema_errors(validator: Validator, instance: Any, where: str) -> list[str]:
    return [
        f"{where}{''.join(f'/{p}' for p in error.absolute_path)}: {error.message[:200]}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


# -- OpenAPI 3.1 --------------------------------------------------------------------


def _oas31(doc: dict[str, Any], ref: str) -> Validator:
    """An OAS 3.1 validator of ``{"$ref": ref}`` resolved in ``doc``."""
    validator: Validator = OAS31Validator(
        {"$ref": ROOT + ref}, registry=_registry(doc, DRAFT202012), format_checker=FormatChecker()
    )
    return validator


def _registry(doc: dict[str, Any], specification: Specification[Any]) -> Registry[Any]:
    """``doc`` registered as :data:`ROOT`, so ``#/…`` references resolve in it."""
    return Registry().with_resource(ROOT, Resource.from_contents(doc, default_specification=specification))


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A ``$ref``'d parameter or request body, followed within ``doc``."""
    resolver = _registry(doc, DRAFT202012).resolver(ROOT)
    while "$ref" in node:
        resolved = resolver.lookup(node["$ref"])
        node, resolver = resolved.contents, resolved.resolver
    return node


def _operation(doc: dict[str, Any], request: Captured) -> tuple[str, dict[str, str], dict[str, Any]] | None:
    for template, item in doc.get("paths", {}).items():
        found = _match(template, _path(request))
        if found is not None and request.method.lower() in item:
            return template, found, item[request.method.lower()]
    return None


def _openapi31(doc: dict[str, Any], request: Captured) -> list[str]:
    found = _operation(doc, request)
    if found is None:
        return [f"no operation {request.method} {_path(request)} in the document"]
    template, path_values, operation = found
    base = ("paths", template, request.method.lower())
    problems = []
    for index, raw in enumerate(operation.get("parameters", [])):
        parameter = _resolve(doc, raw)
        where, name = parameter["in"], parameter["name"]
        value = {"path": path_values.get(name), "header": _header(request, name)}.get(where)
        if value is None:
            if parameter.get("required"):
                problems.append(f"required {where} parameter {name} is missing")
            continue
        ref = raw.get("$ref") or _pointer(*base, "parameters", str(index))
        problems += _schema_errors(_oas31(doc, ref + "/schema"), value, f"{where} {name}")
    for requirement in operation.get("security", doc.get("security", [])):
        for scheme_name in requirement:
            scheme = doc["components"]["securitySchemes"][scheme_name]
            problems += _auth(request, scheme["scheme"].lower())
    return problems + _request_body(doc, request, operation, base)


def _request_body(
    doc: dict[str, Any], request: Captured, operation: dict[str, Any], base: tuple[str, ...]
) -> list[str]:
    if "requestBody" not in operation:
        return [] if not request.body else ["a body where the operation takes none"]
    raw = operation["requestBody"]
    body_ref = raw["$ref"] if "$ref" in raw else _pointer(*base, "requestBody")
    body = _resolve(doc, raw)
    if body.get("required") and not request.body:
        return ["the required request body is missing"]
    media = _media_type(request)
    if media not in body["content"]:
        accepted = ", ".join(body["content"])
        return [f"Content-Type {media or 'absent'} is not one the operation accepts ({accepted})"]
    schema_ref = body_ref + "/" + _pointer("content", media, "schema")[2:]
    validator = _oas31(doc, schema_ref)
    if media == "application/json":
        instance, problems = _json(request)
        return problems or _schema_errors(validator, instance, "body")
    if media == "multipart/form-data":
        return _form(validator, _resolve(doc, {"$ref": schema_ref}), request)
    return [f"no check written for {media}"]


# -- multipart/form-data (Mailgun) ----------------------------------------------------


def form_parts(request: Captured) -> list[Message]:
    """The parts of a ``multipart/form-data`` body; ValueError if it does not parse."""
    head = f"Content-Type: {_header(request, 'Content-Type')}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.body)
    if not message.is_multipart() or message.defects:
        raise ValueError(f"the multipart body does not parse ({message.defects})")
    return list(message.iter_parts())


def _fields(request: Captured) -> dict[str, list[str]]:
    """A multipart form's fields, name -> values in order (files as their bytes read as UTF-8)."""
    fields: dict[str, list[str]] = {}
    for part in form_parts(request):
        payload = part.get_payload(decode=True)
        name = part.get_param("name", header="content-disposition")
        fields.setdefault(str(name), []).append(payload.decode("utf-8", "replace") if payload else "")
    return fields


def _form(validator: Validator, schema: dict[str, Any], request: Captured) -> list[str]:
    """The form as the schema's object: an array property takes the repeats, others one value."""
    properties = schema.get("properties", {})
    problems: list[str] = []
    try:
        parts = form_parts(request)
    except ValueError as err:
        return [str(err)]
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if part.get_content_disposition() != "form-data" or not isinstance(name, str):
            problems.append(f"a part without Content-Disposition: form-data; name=… ({part.items()})")
            continue
        prop = properties.get(name, {})
        binary = prop.get("items", prop).get("format") == "binary"
        is_file = part.get_filename() is not None
        if binary != is_file:
            said = "binary" if binary else "string"
            problems.append(f"field {name}: {'a file' if is_file else 'text'} where the schema says {said}")
    # A repeat of a property that is not an array is kept as a list, which its "type" then refuses.
    form = {
        name: values if properties.get(name, {}).get("type") == "array" or len(values) > 1 else values[0]
        for name, values in _fields(request).items()
    }
    return problems + _schema_errors(validator, form, "form")


# -- Swagger 2.0 (Postmark) -------------------------------------------------------------


def _swagger2(doc: dict[str, Any], request: Captured) -> list[str]:
    base_path = doc.get("basePath", "/").rstrip("/")
    found = None
    for template, item in doc["paths"].items():
        if _match(base_path + template, _path(request)) is not None and request.method.lower() in item:
            found = template, item[request.method.lower()]
    if found is None:
        return [f"no operation {request.method} {_path(request)} in the document"]
    template, operation = found
    problems = []
    consumes = operation.get("consumes", doc.get("consumes", []))
    if _media_type(request) not in consumes:
        problems.append(
            f"Content-Type {_media_type(request) or 'absent'} is not in consumes ({', '.join(consumes)})"
        )
    registry = _registry(doc, DRAFT4)
    for index, parameter in enumerate(operation.get("parameters", [])):
        ref = ROOT + _pointer("paths", template, request.method.lower(), "parameters", str(index))
        if parameter["in"] == "header":
            value = _header(request, parameter["name"])
            if value is None:
                if parameter.get("required"):
                    problems.append(f"required header {parameter['name']} is missing")
                continue
            schema = {
                k: v
                for k, v in parameter.items()
                if k in {"type", "enum", "maxLength", "minLength", "pattern"}
            }
            problems += _schema_errors(Draft4Validator(schema), value, f"header {parameter['name']}")
        elif parameter["in"] == "body":
            instance, bad = _json(request)
            validator = Draft4Validator(
                {"$ref": ref + "/schema"}, registry=registry, format_checker=FormatChecker()
            )
            problems += bad or _schema_errors(validator, instance, "body")
    return problems


# -- JSON Schemas from the SDKs (Mailjet, Nylas) -------------------------------------------


def _sdk_schema(doc: dict[str, Any], request: Captured) -> list[str]:
    endpoint = doc["x-endpoint"]
    if request.method != endpoint["method"] or _match(endpoint["path"], _path(request)) is None:
        return [f"{request.method} {_path(request)} is not {endpoint['method']} {endpoint['path']}"]
    accepted = endpoint["content-type"]
    accepted = [accepted] if isinstance(accepted, str) else accepted
    problems = []
    if _media_type(request) not in accepted:
        problems.append(f"Content-Type {_media_type(request) or 'absent'} is not {' or '.join(accepted)}")
    problems += _auth(request, endpoint["auth"].split()[0])
    key = _header(request, "Idempotency-Key")
    if key is not None and len(key) > endpoint.get("idempotency-key-max", len(key)):
        problems.append(f"Idempotency-Key is {len(key)} characters, over {endpoint['idempotency-key-max']}")
    instance, bad = _json(request)
    validator = Draft202012Validator(doc, format_checker=FormatChecker())
    return problems + (bad or _schema_errors(validator, instance, "body"))


# -- botocore's service model (SES v2) ---------------------------------------------------------


def _botocore(doc: dict[str, Any], request: Captured) -> list[str]:
    model = ServiceModel(doc, service_name="sesv2")
    operation = next(
        (
            model.operation_model(name)
            for name in model.operation_names
            if model.operation_model(name).http["method"] == request.method
            and _match(model.operation_model(name).http["requestUri"], _path(request)) is not None
        ),
        None,
    )
    if operation is None:
        return [f"no operation {request.method} {_path(request)} in the service model"]
    problems = []
    # rest-json: botocore's serializer gives every structured body Content-Type application/json
    if _media_type(request) != "application/json":
        problems.append(f"Content-Type {_media_type(request) or 'absent'} is not application/json")
    auth = _header(request, "Authorization") or ""
    signing = rf"AWS4-HMAC-SHA256 Credential=[^/]+/\d{{8}}/[a-z0-9-]+/{model.signing_name}/aws4_request, "
    if not re.match(signing, auth) or _header(request, "X-Amz-Date") is None:
        problems.append(
            f"not signed with SigV4 for {model.signing_name} ({auth.split(' ')[0] or 'no Authorization'})"
        )
    instance, bad = _json(request)
    if bad:
        return problems + bad
    params = _from_json(operation.input_shape, instance, operation.name, problems.append)
    report = ParamValidator().validate(params, operation.input_shape)
    if report.has_errors():
        problems += [line.strip() for line in report.generate_report().splitlines() if line.strip()]
    return problems


def _from_json(shape: Shape, value: Any, where: str, problem: Callable[[str], None]) -> Any:
    """The JSON value as botocore's parameters (blobs decoded from base64), checking what
    ParamValidator leaves out: enum, max, pattern."""
    if shape.type_name == "structure" and isinstance(value, dict):
        members = shape.members  # type: ignore[attr-defined]
        return {
            k: _from_json(members[k], v, f"{where}.{k}", problem) if k in members else v
            for k, v in value.items()
        }
    if shape.type_name == "list" and isinstance(value, list):
        if len(value) > shape.metadata.get("max", len(value)):
            problem(f"{where}: more than {shape.metadata['max']} items")
        return [_from_json(shape.member, v, f"{where}[{i}]", problem) for i, v in enumerate(value)]  # type: ignore[attr-defined]
    if shape.type_name == "blob" and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            problem(f"{where}: blob is not base64")
            return value
    if shape.type_name == "string" and isinstance(value, str):
        if "enum" in shape.metadata and value not in shape.enum:
            problem(f"{where}: {value!r} not in {shape.enum}")
        if len(value) > shape.metadata.get("max", len(value)):
            problem(f"{where}: longer than {shape.metadata['max']}")
        if "pattern" in shape.metadata and not re.search(shape.metadata["pattern"], value):
            problem(f"{where}: does not match {shape.metadata['pattern']}")
    return value
