"""OpenAI Assistants API stored in SQLite (SQLAlchemy 2, WAL)."""
