"""Resolve a data source (a local path, a file:// URL or an http(s) URL) to a local file."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx

from tunery.errors import TuneryError

#: Seconds to wait to connect, and between two reads of a download.
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0
_CHUNK = 1024 * 1024


def fetch(source: str, dest_dir: Path, *, max_bytes: int = 2 * 1024**3, allow_local: bool = True,
          storage: bool = False, storage_options: dict | None = None) -> Path:
    """Return a local file holding the data of ``source``.

    * A local path or ``file://`` URL is returned as it is (nothing is copied), if it names
      an existing file and ``allow_local`` is True (a server taking URLs from users sets it
      False, so a user cannot read the server's files).
    * An ``http://`` or ``https://`` URL is downloaded (following redirects) into ``dest_dir``,
      under a name made from the URL; the file appears under that name only once complete.
      A download larger than ``max_bytes`` is refused, by its Content-Length if the server
      sends one and otherwise as soon as it grows past the cap.

    * A storage URL (``s3://…`` or another fsspec back end, with ``storage_options``) is copied
      once into ``dest_dir``, only with ``storage=True``: the training and the CLI read their own
      storage; a URL a user sends the server never reaches it (it would read with the server's
      credentials).

    Raises TuneryError, with a one-line message naming the source and the reason, for a
    missing file, a directory, local paths when not allowed, an HTTP error status, a network
    error, a too large download, or any other URL scheme.
    """
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme in ("http", "https"):
        return _download(source, Path(dest_dir), max_bytes)
    if scheme not in ("", "file") and storage and _fsspec_knows(scheme):
        from tunery.artifacts.run import Storage

        return Storage(source, storage_options).get(source, Path(dest_dir))
    if scheme not in ("", "file"):
        raise TuneryError(
            f"{_shown(source)}: unsupported URL scheme {scheme!r} (use http(s)://, file:// or a path)"
        )
    if not allow_local:
        raise TuneryError(f"{_shown(source)}: local paths are not allowed here; give an http(s):// URL")
    path = _file_url_path(source) if scheme == "file" else Path(source).expanduser()
    if not path.exists():
        raise TuneryError(f"{source}: no such file")
    if path.is_dir():
        raise TuneryError(f"{source}: is a directory, not a JSONL file")
    return path


def _fsspec_knows(scheme: str) -> bool:
    from fsspec.registry import known_implementations, registry

    return scheme in registry or scheme in known_implementations


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (a data file may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise TuneryError(f"{url}: a file:// URL must name a local file (host {parts.netloc!r} given)")
    return Path(url2pathname(unquote(parts.path)))


def _shown(url: str) -> str:
    """A URL fit for messages and logs: without user:password and query string, which is where
    credentials (basic auth, signed-URL tokens) live."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address, which urlsplit returns without its brackets
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def download_name(url: str) -> str:
    """A file name for a download: a short hash of the whole URL (two URLs never share a
    file) followed by the URL's last path segment, reduced to safe characters."""
    tail = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail).lstrip(".")[:100] or "data.jsonl"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{tail}"


def _download(url: str, dest_dir: Path, max_bytes: int) -> Path:
    shown = _shown(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / download_name(url)
    # Written under a temporary name in the same folder, then renamed (atomic on one file
    # system): a crash or an error never leaves a partial file under the final name.
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream_to(url, shown, out, max_bytes)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _stream_to(url: str, shown: str, out: BinaryIO, max_bytes: int) -> None:
    timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    too_large = f"{shown}: download refused: larger than the {_size(max_bytes)} limit"
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as response:
            if response.status_code >= 400:
                raise TuneryError(
                    f"{shown}: download failed: HTTP {response.status_code} {response.reason_phrase}"
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise TuneryError(f"{too_large} (the server says {_size(int(declared))})")
            written = 0
            for chunk in response.iter_bytes(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise TuneryError(too_large)
                out.write(chunk)
    except httpx.HTTPError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TuneryError(f"{shown}: download failed: {reason}") from None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
