"""fetch: local paths and file:// URLs, and downloads from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunery.data import fetch, sha256_file
from tunery.errors import TuneryError

BODY = b'{"text": "hello"}\n{"text": "world"}\n'
BIG = b"x" * 5000


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path == "/data.jsonl":
            self._send(200, BODY)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/data.jsonl")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/big.jsonl":
            self._send(200, BIG)
        elif path == "/big-no-length.jsonl":
            # HTTP/1.0 with no Content-Length: the body ends when the connection closes, so the
            # size is only known by reading it.
            self.close_connection = True
            self.send_response(200)
            self.end_headers()
            for _ in range(5):
                self.wfile.write(BIG[:1000])
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_local_path_and_file_url_are_returned_as_they_are(tmp_path):
    data = tmp_path / "my data.jsonl"
    data.write_bytes(BODY)
    assert fetch(str(data), tmp_path / "dl") == data
    assert fetch(data.as_uri(), tmp_path / "dl") == data
    assert not (tmp_path / "dl").exists()


def test_missing_local_path_and_directory_are_errors(tmp_path):
    with pytest.raises(TuneryError, match=r"nope\.jsonl: no such file"):
        fetch(str(tmp_path / "nope.jsonl"), tmp_path)
    with pytest.raises(TuneryError, match="is a directory"):
        fetch(str(tmp_path), tmp_path)
    with pytest.raises(TuneryError, match="no such file"):
        fetch((tmp_path / "nope.jsonl").as_uri(), tmp_path)


def test_local_paths_can_be_forbidden(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(BODY)
    for source in (str(data), data.as_uri()):
        with pytest.raises(TuneryError, match="local paths are not allowed"):
            fetch(source, tmp_path, allow_local=False)


@pytest.mark.parametrize("source", ["s3://bucket/d.jsonl", "ftp://host/d.jsonl", "file://otherhost/d.jsonl"])
def test_other_schemes_and_remote_file_urls_are_errors(tmp_path, source):
    with pytest.raises(TuneryError, match=source.split("/")[0].rstrip(":")):
        fetch(source, tmp_path)


def test_http_download(server, tmp_path):
    dest = tmp_path / "downloads"
    path = fetch(f"{server}/data.jsonl", dest, allow_local=False)
    assert path.parent == dest and path.name.endswith("-data.jsonl")
    assert path.read_bytes() == BODY
    assert sorted(p.name for p in dest.iterdir()) == [path.name], "no temporary file is left behind"
    # The same URL maps to the same name; another URL (here: another query) to another.
    assert fetch(f"{server}/data.jsonl", dest) == path
    assert fetch(f"{server}/data.jsonl?v=2", dest) != path


def test_redirects_are_followed(server, tmp_path):
    assert fetch(f"{server}/redirect", tmp_path).read_bytes() == BODY


def test_http_error_status_names_the_url_and_status_and_leaves_nothing(server, tmp_path):
    with pytest.raises(TuneryError) as info:
        fetch(f"{server}/missing.jsonl", tmp_path)
    message = str(info.value)
    assert f"{server}/missing.jsonl" in message and "HTTP 404" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_credentials_in_a_url_stay_out_of_messages(server, tmp_path):
    with pytest.raises(TuneryError) as info:
        fetch(f"{server.replace('://', '://user:hunter2@')}/missing.jsonl?X-Signature=s3cr3t", tmp_path)
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)
    assert "/missing.jsonl" in str(info.value)


@pytest.mark.parametrize("name", ["big.jsonl", "big-no-length.jsonl"])
def test_size_cap(server, tmp_path, name):
    with pytest.raises(TuneryError, match="larger than the 4.9 KiB limit"):
        fetch(f"{server}/{name}", tmp_path, max_bytes=4999)
    assert list(tmp_path.iterdir()) == [], "a refused download leaves no partial file"
    assert fetch(f"{server}/{name}", tmp_path, max_bytes=5000).read_bytes() == BIG


def test_connection_refused_is_a_tuneryerror(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TuneryError, match="download failed"):
        fetch(f"http://127.0.0.1:{port}/d.jsonl", tmp_path)


def test_sha256_file(tmp_path):
    path = tmp_path / "d.bin"
    path.write_bytes(BIG * 300)
    assert sha256_file(path) == hashlib.sha256(BIG * 300).hexdigest()
