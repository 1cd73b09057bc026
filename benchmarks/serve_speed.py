"""Serving speed as a user meets it: `tunery serve` started as a user starts it, requests over HTTP.

    python benchmarks/serve_speed.py                   # SmolLM2-135M, 64 new tokens, 1/4/8/16 at once
    python benchmarks/serve_speed.py --quick           # 16 new tokens, 1 and 4 at once, no adapters
    python benchmarks/serve_speed.py --routes openai-stream --levels 1,8

One run, one machine (the CPU's flags come first):
1. the baselines, in this process before the server starts: plain transformers `generate`, one
   request at a time, and tunery's engine in process on the same request: tokens/s of one stream;
2. `tunery serve` in a process of its own (a fresh data directory, SQLite), a token from
   `tunery tokens create`, and (unless --no-adapters) two LoRA versions trained through the API
   with the official `replicate` client (`max_steps` 2: weights that differ from the base);
3. each route at 1, 4, 8 and 16 requests at once, on the base, then on a mix (a third each on the
   base and the two adapters):
   - `replicate-wait`: POST /v1/predictions with `Prefer: wait` (what `replicate.run` sends);
   - `replicate-poll`: POST, then GET every 0.5 s until it ends (the official client's
     `predictions.create` + `wait()`, REPLICATE_POLL_INTERVAL's default);
   - `replicate-stream`: POST with `stream`, then the SSE stream (`replicate.stream`);
   - `openai` and `openai-stream`: POST /openai/v1/chat/completions, whole or streamed;
   aggregate output tokens/s (every request's tokens over the wall time from the first send to
   the last answer), latency p50/p99, time to first token p50/p99 on the streamed routes, and
   the ratio to one request alone;
4. one request alone, per route: the client's wall time against the engine's own time for it
   (the prediction's `metrics.predict_time`, from the engine's submit to its last token);
5. what the store costs one prediction: each write and read it makes (create, start, an output
   flush, finish, GET, the token's lookup), timed on the server's database;
6. `GET /v1/predictions/{id}` p50/p99, every 20 ms, while 8 predictions generate.

Every request samples (temperature 0.8, top_p 0.9, top_k 50) with a fixed seed and generates
exactly --new-tokens tokens (`min_new_tokens`; vLLM's `ignore_eos` on the OpenAI routes), as the
baselines do, so rates compare like for like. Results are appended to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, cpu_flags, git_commit, machine, versions  # noqa: E402
from predict_speed import PROMPTS, in_thread, pct  # noqa: E402

ROUTES = ["replicate-wait", "replicate-poll", "replicate-stream", "openai", "openai-stream"]
POLL_SECONDS = 0.5  # the official replicate client's REPLICATE_POLL_INTERVAL default
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
TERMINAL = ("succeeded", "failed", "canceled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tunery_command() -> list[str]:
    found = shutil.which("tunery", path=str(Path(sys.executable).parent)) or shutil.which("tunery")
    return [found] if found else [sys.executable, "-m", "tunery"]


class Server:
    """`tunery serve` on a free loopback port with a fresh data directory, and a token for it."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="tunery-serve-speed-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TUNERY_HOME": str(self.home), "TUNERY_PUBLIC_URL": self.url, **(extra_env or {})}
        self.env.pop("TUNERY_DATABASE_URL", None)
        self.token = subprocess.run([*tunery_command(), "tokens", "create", "--owner", "bench"], env=self.env,
                                    check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        self.log = open(self.home / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([*tunery_command(), "serve", "--port", str(self.port)], env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"tunery serve exited: {(self.home / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/account", headers=self.headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("tunery serve did not answer within 120 s")
            time.sleep(0.2)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def train_adapters(server: Server, base: str, n: int = 2) -> list[str]:
    """`n` versions trained through the API with the official client (2 steps each): their refs."""
    import replicate

    from tunery.samples import generate
    from tunery.samples.extraction import make_example

    client = replicate.Client(api_token=server.token, base_url=server.url)
    data_path = server.home / "data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in generate(make_example, 32, seed=3)))
    with data_path.open("rb") as f:
        data = client.files.create(f)
    base_version = client.models.get(f"tunery/{base}").latest_version
    trainings = []
    for i in range(n):
        client.models.create(owner="bench", name=f"adapter{i}", visibility="private", hardware="cpu")
        trainings.append(client.trainings.create(
            version=f"tunery/{base}:{base_version.id}", destination=f"bench/adapter{i}",
            input={"train_data": data.urls["get"], "num_train_epochs": 1, "max_steps": 2, "train_batch_size": 4, "run_validation": False,
                   "seed": i}))
    refs = []
    for training in trainings:
        while training.status not in TERMINAL:
            time.sleep(2)
            training.reload()
        if training.status != "succeeded":
            raise SystemExit(f"training {training.id} {training.status}: {training.error}\n{training.logs[-2000:]}")
        refs.append(training.output["version"])
    return refs


class Result:
    """One request's outcome: tokens, latency, first token, the engine's own time."""

    def __init__(self, tokens: int, latency: float, first: float | None, engine: float | None):
        self.tokens, self.latency, self.first, self.engine = tokens, latency, first, engine


def one_request(client, route: str, version: str, model: str, i: int, new_tokens: int) -> Result:
    """Send request `i` on `route` as the official clients send it, and read it to the end."""
    start = time.perf_counter()
    prompt = PROMPTS[i % len(PROMPTS)]
    if route.startswith("replicate"):
        body = {"version": version, "input": {"prompt": prompt, "max_new_tokens": new_tokens,
                                              "min_new_tokens": new_tokens, "seed": 1000 + i, **SAMPLING}}
        if route == "replicate-wait":
            row = client.post("/v1/predictions", json=body, headers={"Prefer": "wait"}).raise_for_status().json()
            while row["status"] not in TERMINAL:  # the wait ran out: the official client polls on
                time.sleep(POLL_SECONDS)
                row = client.get(f"/v1/predictions/{row['id']}").raise_for_status().json()
            first = None
        elif route == "replicate-poll":
            row = client.post("/v1/predictions", json=body).raise_for_status().json()
            while row["status"] not in TERMINAL:
                time.sleep(POLL_SECONDS)
                row = client.get(f"/v1/predictions/{row['id']}").raise_for_status().json()
            first = None
        else:
            row = client.post("/v1/predictions", json=body | {"stream": True}).raise_for_status().json()
            first = None
            with client.stream("GET", row["urls"]["stream"], headers={"Accept": "text/event-stream"}) as response:
                event = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "output" and first is None:
                        first = time.perf_counter() - start
                    elif line.startswith("data:") and event == "done":
                        break
            row = client.get(f"/v1/predictions/{row['id']}").raise_for_status().json()
        latency = time.perf_counter() - start
        if row["status"] != "succeeded":
            raise RuntimeError(f"prediction {row['id']} {row['status']}: {row.get('error')}")
        metrics = row.get("metrics") or {}
        return Result(int(metrics.get("output_token_count") or 0), latency, first, metrics.get("predict_time"))
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "ignore_eos": True, "seed": 1000 + i, "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"]}
    if route == "openai":
        answer = client.post("/openai/v1/chat/completions", json=body).raise_for_status().json()
        return Result(answer["usage"]["completion_tokens"], time.perf_counter() - start, None, None)
    first, tokens = None, 0
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/openai/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
    return Result(tokens, time.perf_counter() - start, first, None)


def level(server: Server, route: str, targets: list[tuple[str, str]], n: int, new_tokens: int,
          during: Callable[[], None] | None = None) -> dict:
    """`n` requests at once on `route`, spread over `targets` ((version ref, OpenAI model) pairs)."""
    import httpx

    results: list[Result | BaseException] = [RuntimeError("not run")] * n
    gate = threading.Barrier(n + 1)

    def send(i: int) -> None:
        version, model = targets[i % len(targets)]
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as client:
            gate.wait()
            try:
                results[i] = one_request(client, route, version, model, i, new_tokens)
            except BaseException as exc:  # reported below with the others
                results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    if during is not None:
        during()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise SystemExit(f"{route}, {n} at once: {len(failed)} failed: {failed[0]!r}")
    done = [r for r in results if isinstance(r, Result)]
    tokens = sum(r.tokens for r in done)
    firsts = [r.first for r in done if r.first is not None]
    engine = [r.engine for r in done if r.engine is not None]
    row = {"route": route, "requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_second": tokens / wall,
           "latency_p50_s": pct([r.latency for r in done], 0.5), "latency_p99_s": pct([r.latency for r in done], 0.99),
           "ttft_p50_s": pct(firsts, 0.5) if firsts else None, "ttft_p99_s": pct(firsts, 0.99) if firsts else None,
           "engine_s_mean": statistics.mean(engine) if engine else None,
           "latency_s_mean": statistics.mean(r.latency for r in done)}
    return row


def prober(server: Server, route_version: str, stop: threading.Event, out: list[float]) -> threading.Thread:
    """GET /v1/predictions/{id} of one running prediction every 20 ms until `stop`."""
    import httpx

    def run() -> None:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
            body = {"version": route_version, "input": {"prompt": PROMPTS[0], "max_new_tokens": 8}}
            ident = client.post("/v1/predictions", json=body).raise_for_status().json()["id"]
            while not stop.is_set():
                t = time.perf_counter()
                client.get(f"/v1/predictions/{ident}").raise_for_status()
                out.append(time.perf_counter() - t)
                time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def store_costs(server: Server, version: str, new_tokens: int, repeat: int = 20) -> dict:
    """What the store costs one prediction, timed on the server's own database (SQLite file)
    while it is idle: each write and read a prediction makes from its creation to its last GET,
    median of `repeat`, in ms; the output flushes are those of one 64-token prediction at the
    engine's rate (one every FLUSH_SECONDS)."""
    from tunery.store.store import Store

    store = Store(f"sqlite:///{server.home / 'tunery.db'}", migrate=False)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append((time.perf_counter() - start) * 1000)
        return out

    try:
        for _ in range(repeat):
            row = timed("create", lambda: store.create_prediction(
                "bench", model="tunery/x", version_id=version, input={"prompt": PROMPTS[0]}, runner="r"))
            timed("start", lambda row=row: store.start_prediction(row.id, "r"))
            pieces = [f" w{j}" for j in range(new_tokens)]
            timed("flush_output", lambda row=row, pieces=pieces: store.set_predictions_output({row.id: pieces}, "r"))
            timed("finish", lambda row=row, pieces=pieces: store.finish_prediction(
                row.id, status="succeeded", output=pieces, metrics={"predict_time": 1.0}, runner="r"))
            timed("get", lambda row=row: store.get_prediction("bench", row.id))
            timed("auth", lambda: store.authenticate(server.token))
    finally:
        store.close()
    return {name: statistics.median(values) for name, values in times.items()}


def baselines(base: str, new_tokens: int) -> dict:
    """Plain `generate` and the engine in process, one request at a time, the API's sampling; each
    from a thread of its own that then ends (see `in_thread`: a thread that did torch work and
    lives on, waiting, slowed the engine's thread)."""
    return in_thread(lambda: plain_baseline(base, new_tokens)) | in_thread(lambda: engine_baseline(base, new_tokens))


def plain_baseline(base: str, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.models.load import pick_dtype
    from tunery.models.resolve import resolve_base

    path = resolve_base(base).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype("auto", "cpu")).eval()

    def plain(i: int, k: int) -> float:
        ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
        torch.manual_seed(1000 + i)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=k, min_new_tokens=k, do_sample=True, pad_token_id=tok.eos_token_id,
                           **SAMPLING)
        return time.perf_counter() - start

    plain(0, 2)
    return {"plain_generate_tokens_per_second": max(new_tokens / plain(i, new_tokens) for i in range(3))}


def engine_baseline(base: str, new_tokens: int) -> dict:
    from tunery.infer.embedded import EmbeddedEngine
    from tunery.infer.generation import Request, SamplingParams

    engine = EmbeddedEngine(base)
    rates, times = [], []
    for i in range(4):
        gen = engine.submit(Request.make(PROMPTS[i % len(PROMPTS)], params=SamplingParams(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=1000 + i, **SAMPLING)), block=True)
        gen.text()
        if i:  # the first loads the model
            rates.append(gen.metrics["output_token_count"] / gen.metrics["predict_time"])
            times.append(gen.metrics["predict_time"])
    engine.close()
    return {"engine_tokens_per_second": max(rates), "engine_predict_time_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--no-adapters", action="store_true", help="the base only (no trainings)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per level; the fastest is kept")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 1 and 4 at once, no adapters")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the server only (to try a setting)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.levels, args.no_adapters = 16, "1,4", True
    levels = [int(x) for x in args.levels.split(",")]
    routes = [r for r in args.routes.split(",") if r]
    unknown = set(routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes {sorted(unknown)}; choose from {ROUTES}")
    print(f"machine: {cpu_flags()}", flush=True)

    from tunery.store.store import base_version_id

    base_line = baselines(args.base, args.new_tokens)
    print(f"one request, in process: plain generate {base_line['plain_generate_tokens_per_second']:.1f} tok/s, "
          f"tunery's engine {base_line['engine_tokens_per_second']:.1f} tok/s "
          f"({base_line['engine_predict_time_s']:.2f} s for {args.new_tokens} tokens)", flush=True)

    server = Server(dict(kv.split("=", 1) for kv in args.server_env))
    try:
        mixes = {"base": [(base_version_id(args.base), f"tunery/{args.base}")]}
        if not args.no_adapters:
            started = time.perf_counter()
            refs = train_adapters(server, args.base)
            print(f"two adapters trained through the API in {time.perf_counter() - started:.0f} s: {refs}", flush=True)
            mixes["mix"] = mixes["base"] + [(ref, ref) for ref in refs]
        table: list[dict] = []
        for mix, targets in mixes.items():
            for route in routes:
                level(server, route, targets, min(len(targets), 2), 4)  # warm-up: models, adapters, templates
                # The best of --repeat runs per level: this kind of machine varies ±15 % run to run.
                rows = [max((level(server, route, targets, n, args.new_tokens) for _ in range(args.repeat)),
                            key=lambda row: row["tokens_per_second"]) for n in levels]
                alone = rows[0]["tokens_per_second"]
                for row in rows:
                    row |= {"weights": mix, "vs_one": row["tokens_per_second"] / alone}
                    first = (f"first token p50 {row['ttft_p50_s'] * 1000:5.0f} ms p99 {row['ttft_p99_s'] * 1000:5.0f} ms"
                             if row["ttft_p50_s"] is not None else "")
                    print(f"{mix:4s} {route:16s} {row['requests']:3d} at once: {row['tokens_per_second']:6.1f} tok/s "
                          f"({row['vs_one']:.2f}x one alone), latency p50 {row['latency_p50_s']:.2f} s "
                          f"p99 {row['latency_p99_s']:.2f} s {first}", flush=True)
                one = rows[0]
                one["vs_plain_generate"] = alone / base_line["plain_generate_tokens_per_second"]
                one["vs_engine"] = alone / base_line["engine_tokens_per_second"]
                engine = (f"; engine's own time {one['engine_s_mean']:.2f} s of the client's {one['latency_s_mean']:.2f} s "
                          f"(API {100 * (one['latency_s_mean'] / one['engine_s_mean'] - 1):+.0f} %)"
                          if one["engine_s_mean"] else "")
                print(f"{mix:4s} {route:16s} one alone: {one['vs_plain_generate']:.2f}x plain generate, "
                      f"{one['vs_engine']:.2f}x the engine in process{engine}", flush=True)
                table += rows
        costs = store_costs(server, mixes["base"][0][0], args.new_tokens)
        print("the store, per prediction (median ms, SQLite): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()),
              flush=True)
        gets: list[float] = []
        stop = threading.Event()
        probe_version = mixes["base"][0][0]
        level(server, "replicate-wait", mixes["base"], 8, args.new_tokens,
              during=lambda: prober(server, probe_version, stop, gets))
        stop.set()
        get_latency = {"p50_ms": pct(gets, 0.5) * 1000, "p99_ms": pct(gets, 0.99) * 1000, "samples": len(gets)}
        print(f"GET /v1/predictions/{{id}} while 8 predictions generate: p50 {get_latency['p50_ms']:.1f} ms, "
              f"p99 {get_latency['p99_ms']:.1f} ms ({len(gets)} requests)", flush=True)
    finally:
        server.stop()
    append_result({"benchmark": "serve_speed", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "commit": git_commit(), "base": args.base, "new_tokens": args.new_tokens, "machine": machine(),
                   "versions": versions(), "server_env": args.server_env, "repeat": args.repeat, **base_line, "table": table, "get_latency": get_latency,
                   "store_ms": costs})


if __name__ == "__main__":
    main()
