"""Helpers of the API tests (no tests here): a real uvicorn server on a loopback port, a
scripted predictor, a plain static file server, and row counts."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import func, select

from tunery.server.app import create_app
from tunery.settings import Settings
from tunery.store.models import File, Prediction, Training, Version

FAKE_BASE = "fake-base"  # base_name of the scripted model "tunery/fake"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """create_app on uvicorn in a thread, on a free loopback port, with a SQLite file under `home`."""

    def __init__(self, home: Path, *, start_workers: bool = False, **overrides: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fields = {
            "home": home,
            "database_url": f"sqlite:///{home / 'tunery.db'}",
            "public_url": self.url,
            "embedded_workers": 1 if start_workers else 0,
        } | overrides
        self.settings = Settings(**fields)
        self.app = create_app(self.settings, start_workers=start_workers)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.store = self.app.state.store
        self.runner = self.app.state.runner

    def client(self, owner: str, scheme: str = "Bearer") -> httpx.Client:
        """An httpx client authenticated as `owner` (created on first use)."""
        token = self.store.create_token(owner)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"{scheme} {token}"}, timeout=60)

    def count(self, table: type) -> int:
        with self.store.session() as s:
            return s.scalar(select(func.count()).select_from(table))

    def counts(self) -> dict[str, int]:
        """Rows of every kind a bad request must not leave behind."""
        return {t.__name__: self.count(t) for t in (Training, Version, File, Prediction)}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ScriptedEngine:
    """The Engine contract (infer/generation.py) with a fixed script of pieces, `delay` seconds apart,
    many requests at once, each on its own thread; honours stop_sequences (cut before the first),
    max_new_tokens (one piece a token), cancel (within one piece); records each request."""

    base = "scripted"
    max_batch = 64
    max_queue = 64

    def __init__(self, pieces: list[str], delay: float = 0.0):
        self.pieces = pieces
        self.delay = delay
        self.calls: list[dict[str, Any]] = []

    def submit(self, request, *, block: bool = False):
        from tunery.infer.generation import Generation

        weights = request.weights
        self.calls.append({"prompt": request.prompt, "weights": str(weights.source) if weights else None,
                           "params": request.params})
        gen = Generation(request)
        threading.Thread(target=self._play, args=(gen,), daemon=True).start()
        return gen

    def _play(self, gen) -> None:
        params = gen.request.params
        gen.started(len(gen.request.prompt.split()))
        text = ""
        for piece in self.pieces[: params.max_new_tokens]:
            if gen.cancelled:
                break
            if self.delay:
                time.sleep(self.delay)
            joined = text + piece
            cut = min((joined.find(s) for s in params.stops if s in joined), default=-1)
            if cut >= 0:
                gen.emit(joined[len(text):cut], tokens=1)
                gen.finish("stop_sequence")
                return
            text = joined
            gen.emit(piece, tokens=1)
        gen.finish("max_new_tokens")

    def load(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0}

    def close(self) -> None:
        pass


class StaticFiles:
    """A plain HTTP server of one folder on another loopback port (an 'http(s) URL' data source)."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def wait_for(fetch, done, timeout: float = 30.0, interval: float = 0.05):
    """Call `fetch()` until `done(result)`; the last result (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last: {result}")
        time.sleep(interval)
