"""Checking an uploaded file without training on it: what the dashboard shows next to a file
right after the upload. The same line-by-line validation a training's create runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter

from tunery.errors import DataError, TuneryError
from tunery.server.deps import Owner, StoreDep
from tunery.server.errors import not_found

router = APIRouter(prefix="/v1/files", tags=["files"])

MAX_LISTED = 1000  # line errors in one answer, as a training's create lists them


@router.get("/{file_id}/check")
def check_file(file_id: str, owner: Owner, store: StoreDep) -> dict[str, Any]:
    """Validate one of the caller's files as training data (JSONL, every line). Always 200 for a
    file that exists: `valid`, the `format` and `rows` of a valid file, else `errors` as a
    training's 422 lists them (`{"file", "line", "field", "reason"}`) and `detail` summarising."""
    from tunery.data import read_jsonl

    row = store.get_file(owner, file_id)
    if row is None or not Path(row.path).is_file():
        raise not_found(f"file {file_id}")
    answer: dict[str, Any] = {"id": row.id, "name": row.name, "size": row.size}
    try:
        data = read_jsonl(row.path, name=row.name)
    except DataError as exc:
        errors = [e.as_dict() for e in exc.errors]
        return answer | {
            "valid": False,
            "format": None,
            "rows": None,
            "detail": exc.summary or str(exc),
            "errors": errors[:MAX_LISTED],
            "errors_total": len(errors),
        }
    except TuneryError as exc:
        error = {"file": row.name, "line": None, "field": None, "reason": str(exc)}
        return answer | {
            "valid": False,
            "format": None,
            "rows": None,
            "detail": str(exc),
            "errors": [error],
            "errors_total": 1,
        }
    return answer | {
        "valid": True,
        "format": data.format,
        "rows": len(data),
        "detail": f"{row.name}: {len(data)} valid {data.format} rows",
        "errors": [],
        "errors_total": 0,
    }
