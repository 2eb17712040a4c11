"""The OpenAI Files and Batch API on the loopback server (tests/fake_openai.py): upload a JSONL
file of chat-completion requests, create a batch of it, poll it through validating ->
in_progress -> a final status, and read its output and error files.

Each poll shows a batch's status and then moves it one on, so a client sees every status. `outcome` says how a
batch ends: completed (every line answered), expired or cancelled (the first `partial` lines
answered, the rest not), or failed (none). `hold` keeps batches in_progress until it is cleared
(a test kills its client meanwhile). Lines are answered by the server's responder and take its
queued faults in order: a status fault becomes that line's entry in the error file."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fake_openai import FakeOpenAI

FINAL = ("completed", "expired", "cancelled", "failed")


@dataclass
class _Batch:
    id: str
    input_file_id: str
    metadata: dict[str, str]
    created_at: int
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    cancel_asked: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }


class FakeBatches:
    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.outcome = "completed"
        self.partial = 0
        """Lines an expired or cancelled batch answered before it ended."""
        self.hold = threading.Event()
        self.files: dict[str, tuple[str, bytes]] = {}
        self.batches: dict[str, _Batch] = {}
        self.created: list[str] = []
        """Batch ids in the order they were created."""
        self.polls = 0
        self.stall_create: threading.Event | None = None
        """When set to an Event, a batch is created but the reply waits until the Event is set."""
        self._lock = threading.Lock()

    # -- HTTP, called from the server's handler

    def get(self, path: str) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[1:]  # without 'v1'
        with self._lock:
            if parts == ["batches"]:
                data = [self.batches[b].as_json() for b in reversed(self.created)]
                return 200, {"object": "list", "data": data, "has_more": False}
            if len(parts) == 2 and parts[0] == "batches" and parts[1] in self.batches:
                self.polls += 1
                batch = self.batches[parts[1]]
                seen = batch.as_json()  # this poll sees the status; the next one the one after
                self._advance(batch)
                return 200, seen
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and parts[1] in self.files:
                return 200, self.files[parts[1]][1]
        return 404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}}

    def post(self, path: str, content_type: str, raw: bytes) -> tuple[int, Any]:
        code, body = self._post(path, content_type, raw)
        if path.rstrip("/").endswith("/batches") and self.stall_create is not None:
            self.stall_create.wait(60)  # created, but the reply waits (a client killed meanwhile)
        return code, body

    def _post(self, path: str, content_type: str, raw: bytes) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[1:]
        with self._lock:
            if parts == ["files"]:
                name, data = _uploaded_file(content_type, raw)
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = (name, data)
                return 200, _file_json(file_id, name, data, "batch")
            if parts == ["batches"]:
                body = json.loads(raw)
                if body.get("input_file_id") not in self.files:
                    return 400, {"error": {"message": "no such input file", "type": "invalid_request_error"}}
                batch_id = f"batch_{len(self.batches) + 1}"
                self.batches[batch_id] = _Batch(
                    batch_id, body["input_file_id"], dict(body.get("metadata") or {}), int(time.time())
                )
                self.created.append(batch_id)
                return 200, self.batches[batch_id].as_json()
            if (
                len(parts) == 3
                and parts[0] == "batches"
                and parts[2] == "cancel"
                and parts[1] in self.batches
            ):
                batch = self.batches[parts[1]]
                batch.cancel_asked, batch.status = True, "cancelling"
                return 200, batch.as_json()
        return 404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}}

    # -- the batch's life

    def _advance(self, batch: _Batch) -> None:
        if batch.status in FINAL:
            return
        if batch.status == "validating":
            batch.status = "in_progress"
        elif batch.status == "cancelling" or batch.cancel_asked:
            self._finish(batch, "cancelled")
        elif not self.hold.is_set():
            self._finish(batch, self.outcome)

    def _finish(self, batch: _Batch, status: str) -> None:
        lines = [
            json.loads(line) for line in self.files[batch.input_file_id][1].decode().splitlines() if line
        ]
        answered = {"completed": len(lines), "failed": 0}.get(status, self.partial)
        outputs, errors = [], []
        for line in lines[:answered]:
            code, body = self.fake._answer(line["body"])
            entry = {"id": f"req-{line['custom_id']}", "custom_id": line["custom_id"]}
            if code == 200:
                outputs.append(entry | {"response": {"status_code": 200, "body": body}, "error": None})
            else:
                error = body.get("error", {})
                errors.append(
                    entry
                    | {
                        "response": {"status_code": code, "body": body},
                        "error": {"code": str(code), "message": error.get("message", "")},
                    }
                )
        batch.counts = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}
        for kind, entries in (("output", outputs), ("error", errors)):
            if entries:
                file_id = f"file-{len(self.files) + 1}"
                data = "".join(json.dumps(e) + "\n" for e in entries).encode()
                self.files[file_id] = (f"{batch.id}_{kind}.jsonl", data)
                setattr(batch, f"{kind}_file_id", file_id)
        batch.status = status


def _uploaded_file(content_type: str, raw: bytes) -> tuple[str, bytes]:
    """The file part of a multipart/form-data upload: (filename, bytes)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            payload = part.get_payload(decode=True)
            return part.get_filename() or "upload.jsonl", payload if isinstance(payload, bytes) else b""
    raise ValueError("no file in the upload")


def _file_json(file_id: str, name: str, data: bytes, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": name,
        "purpose": purpose,
        "status": "processed",
    }
