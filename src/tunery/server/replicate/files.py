"""Uploaded files (Replicate's /v1/files): training data sent to the server itself, whose
`urls.get` is then passed as `train_data`; and `/check`, the dashboard's look at a file as
training data right after its upload (the one check a training's create runs)."""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Response, UploadFile
from fastapi.responses import StreamingResponse

from tunery.server.deps import BaseUrl, Owner, PagingDep, SettingsDep, StoreDep
from tunery.server.download import download
from tunery.server.errors import invalid, not_found
from tunery.server.replicate.shapes import file_json
from tunery.service import files

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201)
def create_file(
    content: UploadFile,
    owner: Owner,
    store: StoreDep,
    settings: SettingsDep,
    base: BaseUrl,
    filename: Annotated[str | None, Form()] = None,
    declared_type: Annotated[str | None, Form(alias="type")] = None,
    metadata: Annotated[str | None, Form()] = None,
) -> dict[str, Any]:
    """Store the multipart field `content` (at most settings.max_upload_bytes: 413 beyond)."""
    meta = _metadata(metadata)
    name = Path(filename or content.filename or "file").name or "file"
    content_type = (
        declared_type or content.content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    )
    row = files.save_upload(store, settings, owner, content.file, name=name, content_type=content_type, meta=meta)
    return file_json(row, base)


@router.get("")
def list_files(owner: Owner, store: StoreDep, paging: PagingDep, base: BaseUrl) -> dict[str, Any]:
    page = store.list_files(owner, cursor=paging.cursor, limit=paging.limit)
    return paging.render(page, lambda row: file_json(row, base))


@router.get("/{file_id}")
def get_file(file_id: str, owner: Owner, store: StoreDep, base: BaseUrl) -> dict[str, Any]:
    row = store.get_file(owner, file_id)
    if row is None:
        raise not_found(f"file {file_id}")
    return file_json(row, base)


@router.get("/{file_id}/download")
def download_file(file_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> StreamingResponse:
    row = store.get_file(owner, file_id)
    if row is None or not files.file_exists(settings, row):
        raise not_found(f"file {file_id}")
    return download(settings.objects.open(row.path), filename=row.name, size=row.size, media_type=row.content_type)


@router.get("/{file_id}/check")
def check_file(file_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Validate one of the caller's files as training data (JSONL, every line). Always 200 for a
    file that exists: `valid`, the `format` and `rows` of a valid file, else `errors` as a
    training's 422 lists them (`{"file", "line", "field", "reason"}`) and `detail` summarising."""
    row = store.get_file(owner, file_id)
    if row is None or not files.file_exists(settings, row):
        raise not_found(f"file {file_id}")
    check = files.check_file(store, settings, row)
    answer: dict[str, Any] = {"id": row.id, "name": row.name, "size": row.size, "valid": check.valid,
                              "format": check.format, "rows": check.rows}
    if check.valid:
        detail = f"{row.name}: {check.rows} valid {check.format} rows"
    else:
        detail = check.summary
    return answer | {"detail": detail, "errors": check.errors[:files.MAX_LISTED], "errors_total": len(check.errors)}


@router.delete("/{file_id}", status_code=204)
def delete_file(file_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> Response:
    """Delete the file's record and its bytes (trainings already queued keep their own copy
    when the file was fetched; one given by its URL is read again by the worker: delete a file
    only once the trainings using it have started)."""
    row = store.get_file(owner, file_id)
    if row is None or not files.delete_file(store, settings, owner, row):
        raise not_found(f"file {file_id}")
    return Response(status_code=204)


def _metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid(
            f"metadata: not valid JSON ({exc.msg})", [{"field": "metadata", "reason": "not JSON"}]
        ) from None
    if not isinstance(value, dict):
        raise invalid("metadata: must be a JSON object", [{"field": "metadata", "reason": "not an object"}])
    return value
