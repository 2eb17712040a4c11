"""The REST API under /api/v1: pydantic models for every request and response, bearer tokens
with roles (cai.auth), and errors as RFC 9457 problem details. It calls the stage and store
layers, as the CLI and the web UI do."""
