"""Load test of `dallemini serve` on 127.0.0.1: many concurrent clients, overload, and how batching pays.

Starts the real server (`python -m dallemini.cli serve`, a separate process) on a free loopback port
with a small random model, runs `--clients` concurrent clients for `--seconds` (each: POST
/v1/generate with 1, 2 or 4 images and one of a few sampling settings, again and again; after a
429/503 it waits Retry-After, at most 1 s), or with `--rate` requests that arrive at random
whatever the answers (open loop: how latency behaves below saturation), then shuts the server down
gracefully. It does this three
times in the same run, on the same model and workload: continuous batching (`--batching continuous`,
at most `--batch` images), request-level batching (`--batching request`, same bound) and no batching
(request-level, 1 image). Prints and records in benchmarks/results/load_serve.json, per setting:
responses by status, 5xx count, requests accepted by the server but never answered (must be 0),
429/503 overflows, p50/p95 latency (all requests, and 1-image requests), images/s; the ratios of
continuous to request-level batching; and a drain check: a server with one stalled client (headers
sent, body never finished) gets SIGTERM and must exit within its drain deadline + 5 s.

    python benchmarks/load_serve.py                 # 64 clients, 20 s per setting, tiny model
    python benchmarks/load_serve.py --seconds 5 --clients 16
    python benchmarks/load_serve.py --rate 8        # open loop: 8 requests/s arriving at random

Traffic goes only to 127.0.0.1, and every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, merge_results
from dallemini.random_model import create_random_model, seed_captions
from dallemini.serve.server import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "load_serve.json"
HOST = "127.0.0.1"


# The workload's sampling settings (each request picks one): requests with other settings can share
# a continuous batch, but not a request-level one.
SETTINGS = (
    {},
    {"temperature": 1.3},
    {"top_k": 8},
    {"top_p": 0.9, "temperature": 0.8},
)


def start_server(
    model: Path,
    port: int,
    max_batch_images: int,
    args: argparse.Namespace,
    batching: str = "continuous",
    drain_timeout_s: float = 60.0,
):
    """The server process, once /health answers."""
    cmd = [
        sys.executable,
        "-m",
        "dallemini.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-batch-images",
        str(max_batch_images),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(args.max_queue),
        "--timeout-s",
        str(args.timeout_s),
        "--batching",
        batching,
        "--drain-timeout-s",
        str(drain_timeout_s),
    ]
    log = open(args.log_dir / f"server-{port}.log", "w")  # noqa: SIM115 (a file the process keeps)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up in 120 s")


async def request(
    http: httpx.AsyncClient, url: str, rng: random.Random, prompts: list[str], log: list[dict]
) -> float | None:
    """Send one request; record status, latency and images. Returns Retry-After on 429/503."""
    body = {"prompt": rng.choice(prompts), "num_images": rng.choice([1, 2, 4])}
    body |= rng.choice(SETTINGS)
    t0 = time.monotonic()
    entry: dict = {"images": body["num_images"]}
    retry = None
    try:
        r = await http.post(url, json=body)
        entry["status"] = r.status_code
        if r.status_code == 200:
            entry["got"] = len(r.json()["images"])
        elif r.status_code in (429, 503):
            retry = float(r.headers.get("retry-after", "1"))
    except httpx.HTTPError as e:
        entry["status"] = f"error: {type(e).__name__}"
    entry["latency"] = time.monotonic() - t0
    log.append(entry)
    return retry


async def client(
    http: httpx.AsyncClient, url: str, stop_at: float, rng: random.Random, log: list[dict]
) -> None:
    """Closed loop: send requests one after another until stop_at (after a 429/503, wait
    Retry-After, at most 1 s)."""
    prompts = seed_captions()
    while time.monotonic() < stop_at:
        retry = await request(http, url, rng, prompts, log)
        if retry is not None:
            await asyncio.sleep(min(retry, 1.0, max(0.0, stop_at - time.monotonic())))


async def arrivals(
    http: httpx.AsyncClient, url: str, stop_at: float, rate: float, log: list[dict]
) -> None:
    """Open loop: requests arrive at random (Poisson, `rate` a second) whatever the answers."""
    rng, prompts, sent = random.Random(0), seed_captions(), []
    while time.monotonic() < stop_at:
        sent.append(asyncio.create_task(request(http, url, random.Random(len(sent)), prompts, log)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*sent)


async def load(
    port: int, clients: int, seconds: float, timeout_s: float, rate: float | None = None
) -> tuple[list, float]:
    """Run the clients (or, with `rate`, open-loop arrivals over at most `clients` connections);
    returns the log and the wall time from the first request to the last answer."""
    url = f"http://{HOST}:{port}/v1/generate"
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    log: list[dict] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s + 30) as http:
        start = time.monotonic()
        stop_at = start + seconds
        if rate is not None:
            await arrivals(http, url, stop_at, rate, log)
        else:
            rngs = [random.Random(i) for i in range(clients)]
            await asyncio.gather(
                *(client(http, url, stop_at, rngs[i], log) for i in range(clients))
            )
        wall = time.monotonic() - start
    return log, wall


def summarize(log: list[dict], wall: float, health: dict) -> dict:
    """Figures of one setting."""
    statuses: dict[str, int] = {}
    for e in log:
        statuses[str(e["status"])] = statuses.get(str(e["status"]), 0) + 1
    ok = [e for e in log if e["status"] == 200]
    lat = np.array([e["latency"] for e in ok]) if ok else np.array([float("nan")])
    single = [e["latency"] for e in ok if e["images"] == 1] or [float("nan")]
    images = sum(e["got"] for e in ok)
    stats = health["stats"]
    accepted = stats["done"] + stats["failed"] + stats["cancelled"] + stats["expired"]
    return {
        "requests": len(log),
        "statuses": statuses,
        "server_errors_5xx": sum(
            n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s != "503"
        ),
        "transport_errors": sum(n for s, n in statuses.items() if not s.isdigit()),
        "overflow_429": statuses.get("429", 0),
        "shutting_down_503": statuses.get("503", 0),
        "accepted_by_server": accepted,
        "answered_200": len(ok),
        # Clients send only valid requests: every HTTP answer but 429/503 is for an accepted request.
        "lost_accepted": accepted - sum(n for s, n in statuses.items() if s not in ("429", "503")),
        "images_short": sum(e["images"] - e["got"] for e in ok),
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
        "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
        "one_image_latency_p50_s": round(float(np.percentile(single, 50)), 4),
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_s": round(images / wall, 2),
        "decoder_batches": stats["batches"],
        "images_per_pipeline_call": round(stats["images"] / max(1, stats["batches"]), 2),
    }


def run_setting(
    model: Path, max_batch_images: int, batching: str, args: argparse.Namespace
) -> dict:
    """Start a server, load it, read its counters, shut it down gracefully."""
    port = free_port(HOST)
    proc = start_server(model, port, max_batch_images, args, batching)
    try:
        log, wall = asyncio.run(load(port, args.clients, args.seconds, args.timeout_s, args.rate))
        health = httpx.get(f"http://{HOST}:{port}/health", timeout=10).json()
    finally:
        proc.terminate()  # SIGTERM: graceful shutdown
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = summarize(log, wall, health)
    out["max_batch_images"] = max_batch_images
    out["batching"] = batching
    return out


def drain_check(model: Path, args: argparse.Namespace, drain_s: float = 5.0) -> dict:
    """SIGTERM a server that has one stalled client; seconds until it exits (must be <= drain_s + 5)."""
    port = free_port(HOST)
    proc = start_server(model, port, 4, args, drain_timeout_s=drain_s)
    stalled = socket.create_connection((HOST, port), timeout=5)
    try:
        head = (
            f"POST /v1/generate HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            "Content-Length: 200\r\n\r\n"
        )
        stalled.sendall(head.encode() + b'{"prompt": "a')  # and never the rest
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(drain_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        seconds = time.monotonic() - t0
    finally:
        stalled.close()
    return {
        "drain_timeout_s": drain_s,
        "exit_s": round(seconds, 2),
        "within_deadline_plus_5s": seconds <= drain_s + 5,
    }


def _line(r: dict) -> str:
    return (
        f"  {r['answered_200']} OK, 5xx {r['server_errors_5xx']}, "
        f"transport errors {r['transport_errors']}, lost accepted {r['lost_accepted']}, "
        f"overflow 429 {r['overflow_429']}, 503 {r['shutting_down_503']}, "
        f"p50 {r['latency_p50_s']:.3f} s, p95 {r['latency_p95_s']:.3f} s, "
        f"1-image p50 {r['one_image_latency_p50_s']:.3f} s, {r['images_per_s']:.1f} images/s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0, help="load time per setting")
    p.add_argument("--batch", type=int, default=16, help="max_batch_images of the batched runs")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--preset", default="tiny", help="random model preset (tiny: 64 px, 16 tokens)")
    p.add_argument("--model", type=Path, help="serve this model directory instead")
    p.add_argument(
        "--rate",
        type=float,
        help="open loop: requests arrive at random, this many a second (default: closed-loop clients)",
    )
    args = p.parse_args()
    if args.rate is not None and not 0 < args.rate <= 1000:
        p.error("--rate must be in (0, 1000] requests a second")
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 600:
        p.error("--clients must be 1..1024 and --seconds 0..600")

    with tempfile.TemporaryDirectory() as tmp:
        args.log_dir = Path(tmp)
        model = args.model or create_random_model(Path(tmp) / "model", preset=args.preset)
        runs = {}
        for name, n, batching in (
            ("continuous", args.batch, "continuous"),
            ("request", args.batch, "request"),
            ("unbatched", 1, "request"),
        ):
            print(f"{name} (max_batch_images={n}): {args.clients} clients, {args.seconds:g} s ...")
            runs[name] = run_setting(model, n, batching, args)
            print(_line(runs[name]))
        print("drain: SIGTERM with a stalled client ...")
        drain = drain_check(model, args)
        print(
            f"  exited {drain['exit_s']} s after SIGTERM (drain deadline {drain['drain_timeout_s']} s)"
        )
    cont, req = runs["continuous"], runs["request"]
    ratios = {
        "images_per_s": round(cont["images_per_s"] / max(1e-9, req["images_per_s"]), 2),
        "one_image_latency_p50": round(
            cont["one_image_latency_p50_s"] / max(1e-9, req["one_image_latency_p50_s"]), 2
        ),
        "latency_p95": round(cont["latency_p95_s"] / max(1e-9, req["latency_p95_s"]), 2),
    }
    print(
        f"continuous / request-level: {ratios['images_per_s']}x images/s, "
        f"{ratios['one_image_latency_p50']}x 1-image p50 latency, {ratios['latency_p95']}x p95 latency"
    )
    record = {
        "model": str(args.model) if args.model else f"random {args.preset}",
        "clients": args.clients,
        "arrivals": f"open loop, {args.rate:g} requests/s" if args.rate else "closed loop",
        "max_batch_images": args.batch,
        "seconds_per_setting": args.seconds,
        "settings_mix": list(SETTINGS),
        "max_wait_ms": args.max_wait_ms,
        "max_queue_images": args.max_queue,
        "runs": runs,
        "continuous_over_request": ratios,
        "drain": drain,
        "machine": machine_info(torch.device("cpu")),
    }
    load_kind = f"{args.rate:g}rps" if args.rate else f"{args.clients}clients"
    key = f"{record['model']}-{load_kind}-batch{args.batch}"
    merge_results(RESULTS, key, record)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
