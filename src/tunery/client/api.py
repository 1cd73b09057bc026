"""A small HTTP client of tunery's API, for the `tunery trainings` / `tunery predictions` commands.

Plain functions over httpx; the official `replicate` client works too, this one only avoids
the dependency and speaks tunery's extras (file uploads by path, logs, SSE without a client).
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tunery.errors import TuneryError
from tunery.store.models import TERMINAL


class ApiError(TuneryError):
    """The server answered an error; the message is its problem detail (and the listed errors)."""

    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text or response.reason_phrase}
        detail = body.get("detail") if isinstance(body, dict) else None
        lines = [f"HTTP {self.status}: {detail or body}"]
        for err in (body.get("errors") or [])[:20] if isinstance(body, dict) else []:
            where = ":".join(str(err[k]) for k in ("file", "line") if err.get(k) is not None)
            lines.append(f"  {where + ': ' if where else ''}{err.get('field') or ''}: {err.get('reason')}")
        super().__init__("\n".join(lines))


class Api:
    """Authenticated requests to one tunery server."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 60.0):
        if not token:
            raise TuneryError(
                "no API token: pass --token or set TUNERY_TOKEN (create one with "
                "`tunery tokens create --owner NAME`)"
            )
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a successful answer; ApiError otherwise, TuneryError when unreachable."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TuneryError(f"cannot reach the tunery server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json() if response.content else None

    def upload(self, path: Path) -> dict[str, Any]:
        """Upload a local file with POST /v1/files; returns the file object."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with open(path, "rb") as f:
            return self.request("POST", "/v1/files", files={"content": (path.name, f, content_type)})

    def version_path(self, ref: str) -> str:
        """'/v1/models/o/n/versions/id' for 'o/n:id', or for a base model's name ('smollm2-135m'
        or 'tunery/smollm2-135m': its latest version)."""
        if ":" in ref:
            name, _, version_id = ref.rpartition(":")
        else:
            name = ref if "/" in ref else f"tunery/{ref}"
            latest = self.request("GET", f"/v1/models/{name}").get("latest_version")
            if not latest:
                raise TuneryError(f"model {name} has no version")
            version_id = latest["id"]
        return f"/v1/models/{name}/versions/{version_id}"

    def pages(self, path: str, limit: int) -> Iterator[dict[str, Any]]:
        """Up to `limit` results of a list, following `next`."""
        url: str | None = path
        count = 0
        while url and count < limit:
            page = self.request("GET", url)
            for item in page["results"]:
                if count >= limit:
                    return
                count += 1
                yield item
            url = page.get("next")

    def follow_logs(self, training_id: str, *, interval: float = 2.0) -> Iterator[str]:
        """New log text of a training as it appears, until it ends; the last item is its status."""
        shown = 0
        while True:
            training = self.request("GET", f"/v1/trainings/{training_id}")
            logs = training.get("logs") or ""
            if len(logs) > shown:
                yield logs[shown:]
                shown = len(logs)
            if training["status"] in TERMINAL:
                return
            time.sleep(interval)

    def wait_prediction(self, prediction: dict[str, Any], *, interval: float = 0.5) -> dict[str, Any]:
        """Poll a prediction until it ends."""
        while prediction["status"] not in TERMINAL:
            time.sleep(interval)
            prediction = self.request("GET", f"/v1/predictions/{prediction['id']}")
        return prediction

    def stream(self, url: str) -> Iterator[tuple[str, str]]:
        """(event, data) pairs of a server-sent event stream, until `done`."""
        event: str | None = None
        data: list[str] = []
        with self.http.stream(
            "GET",
            url,
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(60.0, connect=10.0, read=None),
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            for line in response.iter_lines():
                if line.startswith(":"):
                    continue
                if not line:
                    if event is not None:
                        yield event, "\n".join(data)
                        if event == "done":
                            return
                    event, data = None, []
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)


def parse_assignment(text: str) -> tuple[str, Any]:
    """'key=value' with the value read as JSON when it is JSON (3, 0.5, true, null, [..]), else text."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise TuneryError(f"--input {text!r}: expected key=value")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
