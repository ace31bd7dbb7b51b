"""Live servers on 127.0.0.1 over the tiny random llama (ktcore.testing.tiny_model + a char tokenizer)."""

from __future__ import annotations

import contextlib
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'ktcore[server]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'ktcore[server]')")
pytest.importorskip("sqlalchemy", reason="the Assistants API needs sqlalchemy (pip install 'ktcore[server]')")

import torch  # noqa: E402

from ktcore.server.app import create_app  # noqa: E402
from ktcore.server.engine import Engine  # noqa: E402
from ktcore.server.guard import AccessPolicy  # noqa: E402
from ktcore.server.loading import load_for_serving  # noqa: E402
from ktcore.server.runner import ServerThread  # noqa: E402

API_KEY = "sk-test-secret"


@contextlib.contextmanager
def _slowed(engine: Engine, seconds: float):
    """Every engine step takes at least ``seconds`` longer, whichever path it runs (eager forward, fused CPU
    decode, CUDA graph): tests that act mid-reply need a reply still running when they act."""
    core = engine.core
    step = core.step

    def slow_step():
        time.sleep(seconds)
        return step()

    core.step = slow_step
    try:
        yield
    finally:
        del core.step


@pytest.fixture
def slowed():
    """``with slowed(engine, seconds):`` makes every engine step take ``seconds`` longer."""
    return _slowed


@pytest.fixture(scope="session")
def tiny():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_for_serving("tiny:llama")


def _serve(tiny, tmp_path_factory, **kwargs):
    model, tokenizer, info = tiny
    engine = Engine(model, tokenizer, max_concurrency=kwargs.pop("max_concurrency", 4))
    db = tmp_path_factory.mktemp("db") / "assistants.sqlite3"
    app = create_app(engine, tokenizer, info, db_path=db, web=True, **kwargs)
    return ServerThread(app).start()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = _serve(tiny, tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny, tmp_path_factory):
    srv = _serve(tiny, tmp_path_factory, access=AccessPolicy(api_key=API_KEY))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def model_name(tiny):
    return tiny[2].name


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]
