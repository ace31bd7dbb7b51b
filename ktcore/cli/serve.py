"""``kt serve MODEL``: the OpenAI/Ollama-compatible server (see ``ktcore.server``).

It takes ``kt run``'s model options (``model_options``: one option set, the same default rule file, the same
loading), then the server's own; the model is opened once, the engine warmed up at the batch sizes it will
run, and only then does the server listen and say it is ready.
"""

from __future__ import annotations

import argparse
import logging

from .prefix_options import add_prefix_cache_args
from .model_options import MODEL_OPTIONS_HELP, CLIError, add_model_options, check_model_options, open_model, say
from .run import run_guarded

SERVE_EXAMPLES = """\
examples:
  kt serve model.gguf                                   OpenAI /v1 and Ollama /api on http://127.0.0.1:10002
  kt serve model.gguf --web                             also the chat page at http://127.0.0.1:10002/web
  kt serve DeepSeek-V2-Lite-Q4_K_M.gguf --threads 16 --max-concurrency 16 --rules my-rules.yaml
  kt serve model.gguf --host 0.0.0.0 --api-key KEY --allow-host models.example.com
  curl http://127.0.0.1:10002/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "model", "messages": [{"role": "user", "content": "Hi!"}], "stream": true}'
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over OpenAI- and Ollama-compatible HTTP APIs",
        description="Serve MODEL over HTTP: OpenAI /v1 (chat, completions, Assistants), Ollama /api, and a chat\n"
                    "page at /web. The model is loaded as `kt run` loads it (the same model options, the same\n"
                    "default rule file) and warmed up before the server listens. MODEL may also be tiny:<family>,\n"
                    "a random test model.",
        epilog=SERVE_EXAMPLES + "\n" + MODEL_OPTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=10002, help="port to listen on (default 10002)")
    g.add_argument("--model-name", default=None, help="the model id clients use (default: the file's stem)")
    g.add_argument("--max-concurrency", type=int, default=8,
                   help="sequences decoded together (default 8); further requests queue")
    g.add_argument("--web", action="store_true", help="serve the chat web UI at /web")
    g.add_argument("--db", default=None, help="SQLite file of the Assistants API (default: in the user data dir)")
    g.add_argument("--no-assistants", action="store_true", help="turn the Assistants API (and its database) off")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s = p.add_argument_group("access and limits")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every API call")
    s.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages at ORIGIN (e.g. https://app.example.com; '*': any) call the API; pages "
                        "on this machine (localhost, 127.0.0.1) always may. Repeatable")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="serve requests whose Host header names NAME ('*': any); IP addresses, localhost, this "
                        "machine's names and --host are always served. Repeatable")
    s.add_argument("--max-body-mb", type=float, default=8.0, help="refuse larger request bodies (413; default 8)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's headers (default 10)")
    s.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client may take to send a body (default 60)")
    s.add_argument("--max-connections", type=int, default=256,
                   help="open connections and running requests; further requests get 503 (default 256)")
    add_prefix_cache_args(p)
    p.set_defaults(func=run, command="serve")
    return p


def check_server_options(args) -> None:
    """The server's options, before anything is imported or loaded."""
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    if args.max_concurrency < 1:
        raise CLIError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout), ("--max-connections", args.max_connections)):
        if value <= 0:
            raise CLIError(f"{flag} must be > 0, got {value}")


def run(args: argparse.Namespace) -> int:
    return run_guarded(_serve, args)


def _serve(args: argparse.Namespace) -> int:
    check_model_options(args)
    check_server_options(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loaded = open_model(args)
    import uvicorn

    from ktcore.generate import model_device
    from ktcore.prefix_cache import PrefixStore, model_salt
    from ktcore.server import create_app, default_db_path
    from ktcore.server.engine import Engine
    from ktcore.server.guard import AccessPolicy
    from ktcore.server.loading import model_info
    from ktcore.server.runner import ConnectionLimits, uvicorn_config
    from ktcore.warmup import engine_warm_up_sizes, warm_up_engine

    info = model_info(loaded, args.model_name)
    store = PrefixStore.from_options(args, model_device(loaded.model),
                                     model_salt(loaded.spec, *loaded.rule_files, args.device))
    engine = Engine(loaded.model, loaded.tokenizer, max_context=loaded.max_context,
                    max_concurrency=args.max_concurrency, block_size=args.prefix_block, cuda_graph=args.cuda_graph,
                    prefix_store=store)
    sizes = engine_warm_up_sizes(engine)
    seconds = warm_up_engine(engine, loaded.tokenizer, sizes)
    say(args, f"warmed up in {seconds:.1f} s (batch sizes {', '.join(map(str, sizes))})")
    db = None if args.no_assistants else (args.db or default_db_path())
    access = AccessPolicy(api_key=args.api_key, bound_host=args.host, allow_hosts=args.allow_host,
                          allow_origins=args.allow_origin)
    app = create_app(engine, loaded.tokenizer, info, access=access, db_path=db, web=args.web,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)))
    logging.getLogger("ktcore.server").info(
        "serving %s on http://%s:%d (prefix cache: %s; assistants db: %s)", info.name, args.host, args.port,
        store.summary(), db)
    limits = ConnectionLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                              max_connections=args.max_connections)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, log_level=args.log_level)).run()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
