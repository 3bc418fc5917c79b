"""The OpenAPI 3.1 document of the API, built from its models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic.json_schema import models_json_schema

from exporter import __version__
from exporter.api.constants import DEFAULT_PAGE, MAX_BODY_BYTES, MAX_PAGE, PREFIX
from exporter.api.models import (
    ErrorBody,
    ImportList,
    ImportPath,
    ImportView,
    ListQuery,
    RegisterRequest,
)

# --- the OpenAPI document ------------------------------------------------------


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description)


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field's schema without its ``null`` branch (for a query parameter)."""
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        return {**rest, **branches[0]}
    return schema


def _parameters(model: dict[str, Any], where: Literal["query", "path"]) -> list[dict[str, Any]]:
    required = set(model.get("required", []))
    out = []
    for name, schema in model["properties"].items():
        schema = {k: v for k, v in schema.items() if k not in ("title", "description")}
        out.append(
            {
                "name": name,
                "in": where,
                "required": where == "path" or name in required,
                "description": model["properties"][name].get("description", ""),
                "schema": schema if where == "path" else _without_null(schema),
            }
        )
    return out


UNAUTHORIZED_READ = {
    "description": "the basic auth of --web.config.file failed (reads are protected like "
    "/metrics; a valid API bearer token passes too)",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API, from the models above."""
    _, top = models_json_schema(
        [
            (RegisterRequest, "validation"),
            (ListQuery, "validation"),
            (ImportPath, "validation"),
            (ImportView, "serialization"),
            (ImportList, "serialization"),
            (ErrorBody, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top["$defs"]
    query = _parameters(schemas.pop("ListQuery"), "query")
    path = _parameters(schemas.pop("ImportPath"), "path")
    reads: list[dict[str, list[str]]] = [{}, {"basicAuth": []}, {"bearerAuth": []}]
    writes: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    unauthorized_write = _error(
        "no bearer token, or not a token of api.tokens_file (with basic auth on, "
        "the basic-auth middleware answers in text/plain)"
    )
    unauthorized_write["content"]["text/plain"] = {"schema": {"type": "string"}}
    write_errors = {
        "401": unauthorized_write,
        "403": _error("the write API is off: no api.tokens_file in the config"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "import-status-exporter registration API",
            "version": __version__,
            "description": "Pipelines register the imports they start, so the exporter "
            "watches them. Errors are JSON: {error, field}.",
        },
        "paths": {
            f"{PREFIX}/imports": {
                "get": {
                    "operationId": "listImports",
                    "summary": "tracked imports, a page at a time",
                    "description": f"Pages of `limit` imports (default {DEFAULT_PAGE}, "
                    f"at most {MAX_PAGE}) by source and id; follow `next` with "
                    "`?after=` and the same filters until it is null.",
                    "security": reads,
                    "parameters": query,
                    "responses": {
                        "200": _json("ImportList", "a page of tracked imports, by source and id"),
                        "400": _error(
                            "a query parameter is invalid, unknown or repeated, or `after` "
                            "is not a cursor of this API"
                        ),
                        "401": UNAUTHORIZED_READ,
                        "404": _error("unknown source"),
                        "503": _error("the registry replicas share (storage.url) cannot be read"),
                    },
                },
                "post": {
                    "operationId": "registerImport",
                    "summary": "start tracking an import",
                    "description": "Any content type is accepted if the body is JSON; "
                    f"at most {MAX_BODY_BYTES} bytes.",
                    "security": writes,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RegisterRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("ImportView", "already tracked (its name is updated)"),
                        "201": _json("ImportView", "now tracked"),
                        "400": _error(
                            "malformed JSON, not an object, a missing, invalid or unknown "
                            "field, or a source that takes no ids (Rocket.Chat)"
                        ),
                        **write_errors,
                        "404": _error("unknown source"),
                        "409": _error("the source tracks api.max_imports_per_source imports"),
                        "413": _error(f"the body is over {MAX_BODY_BYTES} bytes"),
                        "421": _error(
                            "another shard owns the import and the shards share no database "
                            "(storage.url): register it on the shard the message names"
                        ),
                        "503": _error("the registration could not be stored"),
                    },
                },
            },
            f"{PREFIX}/imports/{{source}}/{{id}}": {
                "parameters": path,
                "get": {
                    "operationId": "showImport",
                    "summary": "one tracked import",
                    "security": reads,
                    "responses": {
                        "200": _json("ImportView", "the import"),
                        "400": _error("the source or id is malformed"),
                        "401": UNAUTHORIZED_READ,
                        "404": _error("unknown source, or the import is not tracked"),
                        "503": _error("the registry replicas share (storage.url) cannot be read"),
                    },
                },
                "delete": {
                    "operationId": "unregisterImport",
                    "summary": "stop tracking an import and forget it",
                    "security": writes,
                    "responses": {
                        "204": {"description": "no longer tracked"},
                        "400": _error("the source or id is malformed"),
                        **write_errors,
                        "404": _error("unknown source, or the import is not tracked"),
                        "409": _error("listed in the config file: remove it there"),
                        "503": _error(
                            "the removal could not be stored (or, on a shared registry, the "
                            "import could not be read): still tracked"
                        ),
                    },
                },
            },
            f"{PREFIX}/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "this document",
                    "security": reads,
                    "responses": {
                        "200": {
                            "description": "the OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "401": UNAUTHORIZED_READ,
                    },
                },
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token of api.tokens_file",
                },
                "basicAuth": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "basic_auth_users of --web.config.file, when set",
                },
            },
        },
    }
