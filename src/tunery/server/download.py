"""File downloads streamed from the storage (a local file or an fsspec object), in 1 MiB chunks."""

from __future__ import annotations

from typing import IO

from fastapi.responses import StreamingResponse

CHUNK = 1024 * 1024


def download(stream: IO[bytes], *, filename: str, size: int, media_type: str) -> StreamingResponse:
    """An attachment response reading `stream` to its end, then closing it."""

    def chunks():
        with stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type=media_type, headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size)})
