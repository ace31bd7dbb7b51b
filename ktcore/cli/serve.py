"""``kt serve MODEL``: the OpenAI/Ollama-compatible server (see ``ktcore.server``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over OpenAI- and Ollama-compatible HTTP APIs",
        description="Serve MODEL (a GGUF file, or tiny:<family> for a random test model) over HTTP: "
                    "OpenAI /v1 (chat, completions, Assistants), Ollama /api, and a chat page at /web.",
    )
    p.add_argument("model", help="GGUF file (first part of a split set), or tiny:<family>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=10002)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every API call")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages at ORIGIN (e.g. https://app.example.com; '*': any) call the API; pages "
                        "on this machine (localhost, 127.0.0.1) always may. Repeatable")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="serve requests whose Host header names NAME ('*': any); IP addresses, localhost, this "
                        "machine's names and --host are always served. Repeatable")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="refuse larger request bodies (413)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's headers")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a client may take to send a body")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections and running requests; further requests get 503")
    p.add_argument("--web", action="store_true", help="serve the chat web UI at /web")
    p.add_argument("--db", default=None, help="SQLite file of the Assistants API (default: in the user data dir)")
    p.add_argument("--no-assistants", action="store_true", help="turn the Assistants API (and its database) off")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the file's stem)")
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together (others queue)")
    p.add_argument("--max-context", type=int, default=None, help="positions per sequence (default: the model's)")
    p.add_argument("--loader", choices=("auto", "ktcore", "transformers"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print(f"kt serve: loading {args.model}", file=sys.stderr, flush=True)  # before the imports take seconds
    import torch
    import uvicorn

    from ktcore.server import create_app, default_db_path
    from ktcore.server.engine import Engine
    from ktcore.server.guard import AccessPolicy
    from ktcore.server.loading import load_for_serving
    from ktcore.server.runner import ConnectionLimits, uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CPU plugins' pools read it
        torch.set_num_threads(args.threads)
    model, tokenizer, info = load_for_serving(args.model, loader=args.loader, name=args.model_name)
    engine = Engine(model, tokenizer, max_context=args.max_context, max_concurrency=args.max_concurrency)
    db = None if args.no_assistants else (args.db or default_db_path())
    access = AccessPolicy(api_key=args.api_key, bound_host=args.host, allow_hosts=args.allow_host,
                          allow_origins=args.allow_origin)
    app = create_app(engine, tokenizer, info, access=access, db_path=db, web=args.web,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)))
    logging.getLogger("ktcore.server").info(
        "serving %s on http://%s:%d (assistants db: %s)", info.name, args.host, args.port, db)
    limits = ConnectionLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                              max_connections=args.max_connections)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, log_level=args.log_level.lower())).run()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
