"""Files: an upload saved into the storage and recorded, the one check of a file as training data
(every line), and the result files a training leaves. Replicate's /v1/files, OpenAI's files and a
training's creation all come here, so each finds the same files and judges them the same way."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunery.service.errors import TooLarge
from tunery.settings import Settings
from tunery.store.models import File
from tunery.store.store import Conflict, Store

CHUNK = 1024 * 1024
#: Bad lines a file's recorded check lists (its status_details); the answers list up to MAX_LISTED.
MAX_DETAILS = 100
MAX_LISTED = 1000
#: The purpose of a training's own result files (its step metrics), as OpenAI names it.
RESULTS = "fine-tune-results"


def save_upload(store: Store, settings: Settings, owner: str, stream: IO[bytes], *, name: str, content_type: str,
                meta: dict[str, Any] | None = None, purpose: str | None = None) -> File:
    """Save an upload into the storage (files/<owner>/...) and record it; its row. TooLarge as soon
    as it passes settings.max_upload_bytes; nothing is left behind when it fails."""
    folder = settings.files_dir / owner
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(8)}-{name[-100:]}"
    url = None
    try:
        size, sha256, md5 = _save(stream, path, settings.max_upload_bytes)
        url = settings.objects.put(path, f"files/{owner}/{path.name}")
        row = store.create_file(owner, name=name, content_type=content_type, size=size, sha256=sha256, md5=md5,
                                path=url, meta=meta, purpose=purpose)
    except BaseException:
        path.unlink(missing_ok=True)
        if url is not None:
            settings.objects.delete(url)
        raise
    path.unlink(missing_ok=True)  # the storage has it
    return row


def _save(stream: IO[bytes], path: Path, limit: int) -> tuple[int, str, str]:
    """Copy the stream to `path`; (size, sha256, md5). TooLarge as soon as it passes `limit`."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    stream.seek(0)
    with open(path, "wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"file too large: the limit is {limit} bytes")
            sha256.update(chunk)
            md5.update(chunk)
            out.write(chunk)
    return size, sha256.hexdigest(), md5.hexdigest()


def delete_file(store: Store, settings: Settings, owner: str, row: File) -> bool:
    """Delete the file's record, then its bytes; False when it was already gone."""
    if not store.delete_file(owner, row.id):
        return False
    settings.objects.delete(row.path)
    return True


def file_exists(settings: Settings, row: File | None) -> bool:
    """Whether `row` is a file whose bytes are still in the storage."""
    return row is not None and settings.objects.exists(row.path)


def local_copy(settings: Settings, row: File) -> Path:
    """The file's bytes on this machine: its own path on local storage, else a copy fetched once
    into the download cache (later calls reuse it)."""
    return settings.objects.get(row.path, settings.download_dir / "files")


# -- the one check -----------------------------------------------------------------------------------

@dataclass
class DataCheck:
    """A file judged as training data: its `format` and `rows` when valid, else every problem
    (`errors`, `{"file", "line", "field", "reason"}`, in file order) and `detail` (the message,
    first lines shown) and `summary` (one line)."""

    name: str
    format: str | None = None
    rows: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""
    summary: str = ""
    lines: list[str] = field(default_factory=list)  # the bad lines, "line N: field: reason"
    heading: str | None = None  # what the file as a whole got wrong, before its bad lines
    dataset: Any = None  # the parsed rows (a data.Dataset) of a valid file

    @property
    def valid(self) -> bool:
        return not self.errors

    def status_details(self) -> str:
        """The problems as a file's record keeps them: the summary, then one bad line a line."""
        shown = self.lines[:MAX_DETAILS]
        if len(self.lines) > MAX_DETAILS:
            shown.append(f"... and {len(self.lines) - MAX_DETAILS} more bad lines")
        return "\n".join(([self.heading] if self.heading else []) + shown) or self.detail


def check_data(path: Path, name: str) -> DataCheck:
    """Read a local JSONL file as training data, every line (data.read_jsonl)."""
    from tunery.data import read_jsonl
    from tunery.errors import DataError, TuneryError

    try:
        data = read_jsonl(path, name=name)
    except DataError as exc:
        lines = [f"line {e.line}: {e.field}: {e.reason}" if e.field else f"line {e.line}: {e.reason}"
                 for e in exc.errors]
        return DataCheck(name, errors=[e.as_dict() for e in exc.errors], detail=str(exc),
                         summary=exc.summary or str(exc), lines=lines, heading=exc.summary)
    except TuneryError as exc:
        return DataCheck(name, errors=[{"file": name, "line": None, "field": None, "reason": str(exc)}],
                         detail=str(exc), summary=str(exc))
    return DataCheck(name, format=data.format, rows=len(data), dataset=data)


def check_file(store: Store, settings: Settings, row: File) -> DataCheck:
    """Check an uploaded file as training data, wherever the storage keeps it (a local folder, s3://,
    ...), and record the outcome on the file: "processed" with its format and rows, or "error"
    with its bad lines."""
    check = check_data(local_copy(settings, row), row.name)
    if check.valid:
        store.record_file_check(row.id, status="processed", details=None, data_format=check.format, rows=check.rows)
    else:
        store.record_file_check(row.id, status="error", details=check.status_details(), data_format=None, rows=None)
    return check


# -- result files -----------------------------------------------------------------------------------

def save_result_file(store: Store, settings: Settings, owner: str, file_id: str, *, name: str, content: bytes,
                     content_type: str) -> File:
    """Record `content` as the result file `file_id` of one of `owner`'s trainings (purpose
    fine-tune-results), through the same storage as uploads; an existing one is kept as it is."""
    existing = store.get_file(owner, file_id)
    if existing is not None:
        return existing
    folder = settings.files_dir / owner
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / f"{file_id}-{name}"
    local.write_bytes(content)
    try:
        url = settings.objects.put(local, f"files/{owner}/{local.name}")
    finally:
        local.unlink(missing_ok=True)
    try:
        row = store.create_file(owner, name=name, content_type=content_type, size=len(content),
                                sha256=hashlib.sha256(content).hexdigest(), md5=hashlib.md5(content).hexdigest(),
                                path=url, file_id=file_id, purpose=RESULTS)
    except Conflict:  # made at the same moment elsewhere: the same bytes under the same name
        return store.get_file(owner, file_id) or existing  # type: ignore[return-value]
    return store.record_file_check(file_id, status="processed", details=None, data_format=None, rows=None) or row
