"""Uploaded files (Replicate's /v1/files): training data sent to the server itself, whose
`urls.get` is then passed as `train_data`."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Response, UploadFile
from fastapi.responses import StreamingResponse

from tunery.server.deps import BaseUrl, Owner, PagingDep, SettingsDep, StoreDep
from tunery.server.download import download
from tunery.server.errors import ApiError, invalid, not_found
from tunery.store.models import File
from tunery.store.objects import file_json

router = APIRouter(prefix="/v1/files", tags=["files"])

_CHUNK = 1024 * 1024


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
    return file_json(store_upload(content, owner, store, settings, name=name, content_type=content_type,
                                  meta=meta), base)


def store_upload(content: UploadFile, owner: str, store, settings, *, name: str, content_type: str,
                 meta: dict[str, Any] | None = None, purpose: str | None = None) -> File:
    """Save an upload into the storage (files/<owner>/...) and record it; its row. Shared by
    Replicate's /v1/files and OpenAI's /openai/v1/files, so both find the same files."""
    folder = settings.files_dir / owner
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(8)}-{name[-100:]}"
    url = None
    try:
        size, sha256, md5 = _save(content, path, settings.max_upload_bytes)
        url = settings.objects.put(path, f"files/{owner}/{path.name}")
        row = store.create_file(
            owner,
            name=name,
            content_type=content_type,
            size=size,
            sha256=sha256,
            md5=md5,
            path=url,
            meta=meta,
            purpose=purpose,
        )
    except BaseException:
        path.unlink(missing_ok=True)
        if url is not None:
            settings.objects.delete(url)
        raise
    path.unlink(missing_ok=True)  # the storage has it
    return row


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
    if row is None or not settings.objects.exists(row.path):
        raise not_found(f"file {file_id}")
    return download(settings.objects.open(row.path), filename=row.name, size=row.size, media_type=row.content_type)


@router.delete("/{file_id}", status_code=204)
def delete_file(file_id: str, owner: Owner, store: StoreDep, settings: SettingsDep) -> Response:
    """Delete the file's record and its bytes (trainings already queued keep their own copy
    when the file was fetched; one given by its URL is read again by the worker: delete a file
    only once the trainings using it have started)."""
    row = store.get_file(owner, file_id)
    if row is None or not store.delete_file(owner, file_id):
        raise not_found(f"file {file_id}")
    settings.objects.delete(row.path)
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


def _save(upload: UploadFile, path: Path, limit: int) -> tuple[int, str, str]:
    """Copy the upload to `path`; (size, sha256, md5). A 413 as soon as it passes `limit`."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    upload.file.seek(0)
    with open(path, "wb") as out:
        while chunk := upload.file.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"file too large: the limit is {limit} bytes", title="Payload too large")
            sha256.update(chunk)
            md5.update(chunk)
            out.write(chunk)
    return size, sha256.hexdigest(), md5.hexdigest()
