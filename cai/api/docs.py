"""/api/v1/docs: the API's reference as one server-rendered page, built from the same OpenAPI
schema as /api/v1/openapi.json. FastAPI's own docs pages load their scripts from a CDN, which
machines without internet access cannot reach; this page needs nothing but the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader

METHODS = ("get", "post", "put", "patch", "delete")


def operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Every operation in path order: method, path, summary, description, parameters, the
    request body's media types and the documented response statuses."""
    found = []
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method not in item:
                continue
            operation = item[method]
            found.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": operation.get("summary", ""),
                    "description": operation.get("description", ""),
                    "parameters": [
                        {
                            "name": p["name"],
                            "where": p["in"],
                            "required": p.get("required", False),
                            "description": p.get("description", ""),
                        }
                        for p in operation.get("parameters", [])
                    ],
                    "body": sorted(operation.get("requestBody", {}).get("content", {})),
                    "responses": sorted(operation.get("responses", {})),
                }
            )
    return found


def render_docs(schema: dict[str, Any]) -> str:
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    return env.get_template("docs.html").render(info=schema.get("info", {}), operations=operations(schema))
