"""`rnnd serve` (torch-free)."""

from __future__ import annotations

import argparse
import os

from . import config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a bundle: Kafka in, a prediction per step out",
        description="Serve a bundle on Kafka. Every setting is also read from RNND_* environment variables and "
        "from a TOML file (--config); precedence: flag > environment > file > default. "
        "See docs/configuration.md.")
    config.add_arguments(p)
    p.add_argument("--print-config-docs", action="store_true", help="print the settings table (Markdown) and exit")
    p.add_argument("--check", action="store_true", help="load the configuration and the model, then exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.print_config_docs:
        print(config.docs_table())
        return 0
    routes = config.routes_from_args(args)
    cfg = next(iter(routes.values())) if routes else config.from_args(args)
    from . import logs

    worker = os.environ.get(config.WORKER_ENV, "")
    logs.setup(cfg.log_format, cfg.log_level, int(worker) if worker.isdigit() else None)
    from .service import Daemon, serve

    if args.check:  # with workers > 1 too: each worker would check the same settings and the same model
        for name, one in (routes or {"": cfg}).items():
            daemon = Daemon(one)
            print(f"ok: {f'route {name}: ' if name else ''}{daemon.model.spec.model.ref} on "
                  f"{daemon.reloader.provider.actual}")
        return 0
    if cfg.workers > 1:
        from .service.workers import supervise

        return supervise(cfg, debug=args.debug)
    return serve(cfg, routes)
