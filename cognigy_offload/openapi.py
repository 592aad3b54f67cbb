"""GET /openapi.json: the OpenAPI 3.1 description, its schemas generated from the msgspec types."""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .models import Accepted, ErrorBody, TaskDocument, WebhookRequest


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI document (built once)."""
    (webhook_ref, accepted_ref, task_ref, _error_ref), components = msgspec.json.schema_components(
        [WebhookRequest, Accepted, TaskDocument, ErrorBody],
        ref_template="#/components/schemas/{name}",
    )
    auth: list[dict[str, list[str]]] = [{"bearer": []}, {"webhookToken": []}]
    common_errors = {
        "401": _error("Missing or wrong webhook token"),
        "405": _error("Method not allowed"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cognigy-offload",
            "version": "0.1.0",
            "description": "Runs heavy PostgreSQL aggregations for Cognigy.AI flows in the "
            "background and pushes the result back into the conversation.",
        },
        "paths": {
            "/webhook/cognigy-trigger": {
                "post": {
                    "summary": "Accept a job from a Cognigy HTTP Request node",
                    "security": auth,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "maxLength": 255},
                        },
                        {
                            "name": "Prefer",
                            "in": "header",
                            "required": False,
                            "description": "wait=<seconds>: answer inline if the result is ready",
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": webhook_ref}},
                    },
                    "responses": {
                        "202": _json("Accepted", "Stored and queued"),
                        "200": {
                            "description": "Inline result (Prefer: wait) or an idempotent repeat",
                            "content": {
                                "application/json": {"schema": {"oneOf": [task_ref, accepted_ref]}}
                            },
                        },
                        "400": _error("Body is not valid JSON"),
                        "409": _error("Idempotency-Key reused with another body"),
                        "413": _error("Body too large"),
                        "415": _error("Body is not JSON"),
                        "422": _error("Schema or query parameter error"),
                        "503": _error("Queue full, shutting down or database unreachable"),
                        **common_errors,
                    },
                }
            },
            "/tasks/{taskId}": {
                "get": {
                    "summary": "The state of a job",
                    "security": auth,
                    "parameters": [
                        {
                            "name": "taskId",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "format": "uuid"},
                        }
                    ],
                    "responses": {
                        "200": _json("TaskDocument", "The task document"),
                        "404": _error("Unknown task"),
                        **common_errors,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": {"description": "The process runs"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready, with why"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {"description": "Text exposition", "content": {"text/plain": {}}}
                    },
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "webhookToken": {"type": "apiKey", "in": "header", "name": "X-Webhook-Token"},
            },
        },
    }


@cache
def _body() -> bytes:
    return msgspec.json.encode(document())


async def endpoint(request: Request) -> Response:
    """Serve the OpenAPI document."""
    return Response(_body(), media_type="application/json")
