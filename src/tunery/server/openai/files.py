"""OpenAI's files under /openai/v1/files: upload (`purpose=fine-tune`), list, retrieve, `/content`,
delete; ids `file-<id>` of the same files Replicate's /v1/files stores. A fine-tune file is checked
as training data as it is uploaded (the service's one file check): `status` "processed", or "error"
with every bad line in `status_details`, and a job on such a file is refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from tunery.server.deps import Owner, SettingsDep, StoreDep
from tunery.server.download import download
from tunery.server.openai.errors import OpenAIError, from_service
from tunery.service import files
from tunery.service.errors import TooLarge
from tunery.store.models import File
from tunery.store.store import Store

router = APIRouter(prefix="/openai/v1", tags=["openai"])

FILE = "file-"
PURPOSES = ("fine-tune",)  # what may be uploaded; "fine-tune-results" files are the jobs' own


def ts(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_object(row: File) -> dict[str, Any]:
    """OpenAI's file object. A file uploaded through Replicate's API has no purpose of its own: it
    shows as "fine-tune", "uploaded" (not checked yet)."""
    return {"id": FILE + row.id, "object": "file", "bytes": row.size, "created_at": ts(row.created_at),
            "filename": row.name, "purpose": row.purpose or "fine-tune", "status": row.status or "uploaded",
            "status_details": row.status_details, "expires_at": None}


def file_row(store: Store, owner: str, file_id: str, *, param: str | None = None) -> File:
    """The caller's file `file-<id>`; a 404 (or, naming `param`, a 400 `invalid_<param>`) otherwise."""
    row = store.get_file(owner, file_id[len(FILE):]) if file_id.startswith(FILE) else None
    if row is None:
        raise OpenAIError(404 if param is None else 400, f"No such File object: {file_id}", param=param or "id",
                          code=None if param is None else f"invalid_{param}")
    return row


@router.post("/files")
def create_file(file: UploadFile, owner: Owner, store: StoreDep, settings: SettingsDep,
                purpose: Annotated[str, Form()]) -> dict[str, Any]:
    """Upload a file (multipart `file` and `purpose`). Only `fine-tune` files are taken; each is
    checked as training data at once."""
    if purpose not in PURPOSES:
        raise OpenAIError(400, f"Invalid purpose '{purpose}': this server takes files for fine-tuning only "
                          "(purpose 'fine-tune')", param="purpose", code="invalid_purpose")
    name = (file.filename or "file").rsplit("/", 1)[-1] or "file"
    try:
        row = files.save_upload(store, settings, owner, file.file, name=name,
                                content_type=file.content_type or "application/jsonl", purpose=purpose)
    except TooLarge as exc:
        raise from_service(exc, param="file") from None
    files.check_file(store, settings, row)
    return file_object(store.get_file(owner, row.id) or row)


@router.get("/files")
def list_files(owner: Owner, store: StoreDep, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: str | None = None,
               order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    """The caller's files, newest first (or oldest with order=asc), after the file `after`."""
    after_id = after[len(FILE):] if after and after.startswith(FILE) else after
    rows, more = store.list_files_after(owner, purpose=purpose, after=after_id, order=order, limit=limit,
                                        unset_purpose="fine-tune")
    data = [file_object(r) for r in rows]
    return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, owner: Owner, store: StoreDep) -> dict[str, Any]:
    return file_object(file_row(store, owner, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> StreamingResponse:
    row = file_row(store, owner, file_id)
    if not files.file_exists(settings, row):
        raise OpenAIError(404, f"No such File object: {file_id} (its content is gone)", param="id")
    return download(settings.objects.open(row.path), filename=row.name, size=row.size,
                    media_type=row.content_type)


@router.delete("/files/{file_id}")
def delete_file(file_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Delete a file (a job still queued on it then fails: delete files once their jobs ran)."""
    row = file_row(store, owner, file_id)
    if not files.delete_file(store, settings, owner, row):
        raise OpenAIError(404, f"No such File object: {file_id}", param="id")
    return {"id": file_id, "object": "file", "deleted": True}



