"""GET /openapi.json: the OpenAPI 3.1 description, its schemas generated from the msgspec types."""

from __future__ import annotations

from functools import cache
from importlib import metadata
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .models import Accepted, ErrorBody, TaskDocument, WebhookRequest

_LOCATION = {
    "Location": {
        "description": "/tasks/<taskId> of the job",
        "schema": {"type": "string"},
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "string"},
    }
}
# GET /readyz (web.readyz); written by hand as web.py builds it from a plain dict.
_READINESS = {
    "title": "Readiness",
    "type": "object",
    "properties": {
        "status": {"enum": ["ready", "not_ready"]},
        "problems": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Why not ready: 'draining: ...', 'queue_full: ...', 'database: ...'",
        },
        "queue": {
            "type": "object",
            "properties": {"depth": {"type": "integer"}, "capacity": {"type": "integer"}},
            "required": ["depth", "capacity"],
        },
        "circuitBreaker": {"enum": ["closed", "open", "half_open"]},
    },
    "required": ["status", "problems", "queue", "circuitBreaker"],
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = _json("ErrorBody", description)
    if headers:
        answer["headers"] = headers
    return answer


def _json(ref: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _version() -> str:
    try:
        return metadata.version("cognigy-offload")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


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
            "version": _version(),
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
                        "202": _json("Accepted", "Stored and queued", _LOCATION),
                        "200": {
                            "description": "Inline result (Prefer: wait) or an idempotent repeat",
                            "headers": _LOCATION,
                            "content": {
                                "application/json": {"schema": {"oneOf": [task_ref, accepted_ref]}}
                            },
                        },
                        "400": _error("Body is not valid JSON"),
                        "409": _error("Idempotency-Key reused with another body"),
                        "413": _error("Body too large"),
                        "415": _error("Body is not JSON"),
                        "422": _error("Schema or query parameter error"),
                        "503": _error(
                            "Queue full, shutting down or database unreachable", _RETRY_AFTER
                        ),
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
                        "503": _error("Database unreachable", _RETRY_AFTER),
                        **common_errors,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": {
                            "description": "The process runs",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"status": {"const": "ok"}},
                                        "required": ["status"],
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": _json("Readiness", "Ready"),
                        "503": _json("Readiness", "Not ready; problems says why", _RETRY_AFTER),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {**components, "Readiness": _READINESS},
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
