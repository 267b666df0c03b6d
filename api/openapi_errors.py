"""The error bodies in the OpenAPI document are the ones the API sends, on every operation.

Every error is a JSON object with a `detail` string (`Problem`). A 422 may add `errors`, one entry per bad
field (`ValidationProblem`; FastAPI's default document says `detail` is a list, which this API never sends).
Operations with a request body also answer 400 when the body is not JSON, and every operation that reads
the database answers 503 with Retry-After while it is unavailable. `document_error_bodies` rewrites the
generated document once so that it says all of this for every operation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from api.schemas import Problem

REF = "#/components/schemas/{model}"
NO_DATABASE = ("/healthz", "/docs", "/redoc")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body/query/path/header, then the field's path")
    msg: str = Field(description="What is wrong with it")
    type: str = Field(description="A machine-readable kind, e.g. missing, int_parsing, value_error")


class ValidationProblem(Problem):
    errors: list[FieldError] | None = Field(
        default=None, description="One entry per bad field, when the request did not match the schema"
    )


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def with_error_bodies(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of `document` whose every operation documents the error bodies it can send."""
    document = copy.deepcopy(document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(ValidationProblem, "serialization")], ref_template=REF)
    schemas.update(defs.get("$defs", {}))
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method not in {"get", "put", "post", "delete", "patch"}:
                continue
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"]["content"] = _json("ValidationProblem")
                if responses["422"].get("description") == "Validation Error":
                    responses["422"]["description"] = "A parameter or field is invalid (`detail` says which)"
            if "requestBody" in operation:
                responses.setdefault(
                    "400", {"description": "The request body is not JSON", "content": _json("Problem")}
                )
            if not path.startswith(NO_DATABASE) and "503" not in responses:
                responses["503"] = {
                    "description": "The job database is unavailable; retry after Retry-After seconds",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}},
                    "content": _json("Problem"),
                }
    text = repr(document["paths"])
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"schemas/{unused}'" not in text:
            schemas.pop(unused, None)
    return document


def document_error_bodies(app: FastAPI) -> None:
    generate: Callable[[], dict[str, Any]] = app.openapi
    made: dict[int, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        generated = generate()  # FastAPI's own, cached until the routes change
        if id(generated) not in made:
            made.clear()
            made[id(generated)] = with_error_bodies(generated)
        return made[id(generated)]

    app.openapi = openapi  # type: ignore[method-assign]
