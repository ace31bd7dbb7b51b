"""OpenAI- and Ollama-compatible HTTP server with continuous batching, the OpenAI Assistants API stored in
SQLite, and a small chat web UI. Start it with ``kt serve MODEL`` or ``create_app`` + uvicorn."""

from __future__ import annotations

import os
from pathlib import Path


def default_db_path() -> Path:
    """``<user data dir>/ktcore/assistants.sqlite3`` (XDG_DATA_HOME, else ~/.local/share)."""
    try:
        from platformdirs import user_data_dir

        base = Path(user_data_dir("ktcore", appauthor=False))
    except ImportError:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "ktcore"
    return base / "assistants.sqlite3"


def create_app(*args, **kwargs):
    """See ``ktcore.server.app.create_app``."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
