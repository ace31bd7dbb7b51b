"""Greedy text through ``kt serve`` equals ``kt run``'s, for every tiny family: ``kt run tiny:<family>`` is run
through ``kt``'s entry point once per prompt; then ``kt serve tiny:<family>`` (its own start-up: the shared model
options, the engine's warm-up, the prefix cache) serves the same prompts at once to the official ``openai``
client, so they are decoded together in one batch where the engine takes them in the same step."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="pip install openai")
uvicorn = pytest.importorskip("uvicorn")

from ktcore.cli import main  # noqa: E402
from ktcore.server.runner import free_port  # noqa: E402
from ktcore.testing import FAMILIES, NEW_FAMILIES  # noqa: E402

PROMPTS = ("hello there", "a longer question about boats?", "x")
TOKENS = 12


class _Served:
    """``kt serve ARGS`` on a thread (its own code path, up to uvicorn's loop), stopped on exit."""

    def __init__(self, monkeypatch, argv: list[str]):
        self.servers: list[uvicorn.Server] = []
        servers = self.servers

        class Recorded(uvicorn.Server):
            def __init__(self, config):
                super().__init__(config)
                servers.append(self)

        monkeypatch.setattr(uvicorn, "Server", Recorded)
        self.code: list[int] = []
        self.thread = threading.Thread(target=lambda: self.code.append(main(argv)), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 300
        while not (self.servers and self.servers[0].started):
            assert self.thread.is_alive() and time.monotonic() < deadline, f"kt serve did not start: {self.code}"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.servers[0].should_exit = True
        self.thread.join(60)
        assert self.code == [0]


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_served_greedy_text_equals_kt_runs(family, capsys, monkeypatch, tmp_path):
    model = f"tiny:{family}"
    expected = []
    for prompt in PROMPTS:
        assert main(["run", model, "-p", prompt, "--max-new-tokens", str(TOKENS), "-q"]) == 0
        out, _ = capsys.readouterr()
        expected.append(out.removesuffix("\n"))
    assert all(expected), "the random model wrote nothing for a prompt: that comparison would be empty"

    port = free_port()
    argv = ["serve", model, "--port", str(port), "--no-assistants", "-q", "--log-level", "warning",
            "--max-concurrency", str(len(PROMPTS)), "--prefix-cache-dir", str(tmp_path)]
    with _Served(monkeypatch, argv):
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                    timeout=120)

        async def ask_all():
            name = (await client.models.list()).data[0].id
            replies = await asyncio.gather(*(client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=TOKENS)
                for p in PROMPTS))
            await client.close()
            return [r.choices[0].message.content for r in replies]

        served = asyncio.run(ask_all())
    assert served == expected
