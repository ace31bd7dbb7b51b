"""The FastAPI application: routes of every API family, the API key check, the web UI."""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from .common import ModelInfo, ServerState
from .engine import Engine
from .errors import APIError, error_response, install_error_handlers

STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health", "/web")  # no API key needed (the page asks for the key itself)


class APIKeyMiddleware:
    """Every request but ``PUBLIC_PATHS`` (and CORS preflights) needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._public(scope["path"]):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            message = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer <key>'"
            response = error_response(scope["path"], APIError(401, message, code="invalid_api_key"))
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _public(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS)


class JSONBodyMiddleware:
    """Treat a POST body as JSON whatever its content type: ``curl -d '{...}'`` (form-encoded by default)
    is how Ollama's and OpenAI's docs call their APIs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            given = dict(scope["headers"]).get(b"content-type", b"")
            if not given.startswith(b"multipart/"):
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        return await self.app(scope, receive, send)


def create_app(engine: Engine, tokenizer, model: ModelInfo, *, api_key: str | None = None,
               db_path: str | Path | None = None, web: bool = True, manage_engine: bool = True) -> FastAPI:
    """An app serving ``engine``. ``db_path``: SQLite file of the Assistants API (``None``: API off).
    ``manage_engine``: start the engine with the app and shut it down after."""
    state = ServerState(engine=engine, tokenizer=tokenizer, model=model)
    if db_path is not None:
        from .assistants.store import AssistantsStore

        state.assistants = AssistantsStore(db_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        if state.assistants is not None:
            state.assistants.recover_interrupted_runs()
        try:
            yield
        finally:
            if state.assistants is not None:
                await state.assistants.stop_runs()
            if manage_engine:
                engine.shutdown()

    app = FastAPI(title="ktcore", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kt = state
    install_error_handlers(app)

    from . import ollama_api, openai_api

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    if state.assistants is not None:
        from .assistants import routes as assistants_routes

        app.include_router(assistants_routes.router)

    @app.get("/health")
    async def health():
        # the chat page reads what it can offer from here: stored conversations, chat at all, the context size
        return {"status": "ok", "model": model.name, "active": engine.active_count, "queued": engine.queued_count,
                "assistants": state.assistants is not None,
                "chat_template": getattr(tokenizer, "chat_template", None) is not None,
                "context_length": engine.max_context}

    @app.get("/")
    async def root():
        return PlainTextResponse("ktcore is running")

    if web:
        @app.get("/web")
        async def web_index():
            return RedirectResponse("/web/")

        app.mount("/web/", StaticFiles(directory=STATIC_DIR, html=True), name="web")

    app.add_middleware(JSONBodyMiddleware)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    # added last, so outermost: a 401 carries CORS headers too
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return app
