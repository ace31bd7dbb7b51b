"""The FastAPI application: routes of every API family, the request guard, CORS, the web UI."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from .common import ModelInfo, ServerState
from .engine import Engine
from .errors import install_error_handlers
from .guard import AccessPolicy, RequestGuard

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 8 << 20


def create_app(engine: Engine, tokenizer, model: ModelInfo, *, access: AccessPolicy | None = None,
               db_path: str | Path | None = None, web: bool = True, manage_engine: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An app serving ``engine``. ``access``: API key, allowed hosts and origins (default: no key, local
    hosts and origins only). ``db_path``: SQLite file of the Assistants API (``None``: API off).
    ``manage_engine``: start the engine with the app and shut it down after. ``max_body_bytes``: larger
    request bodies are refused (413)."""
    access = access or AccessPolicy()
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

    from . import metrics, ollama_api, openai_api

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(metrics.router)
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

    app.add_middleware(RequestGuard, policy=access, max_body_bytes=max_body_bytes)
    # added last, so outermost: a refusal carries CORS headers too
    app.add_middleware(CORSMiddleware, allow_methods=["*"], allow_headers=["*"], **access.cors_options())
    return app
