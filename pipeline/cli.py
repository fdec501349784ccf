"""The ``slipstream`` command line.

    slipstream run CONFIG.toml [--run-dir DIR] [--set key=value ...] [--megatron-KEY V] [--sglang-KEY V] [--dry-run]
    slipstream broker  --config RUN/config.json --run-dir RUN
    slipstream produce --config RUN/config.json --run-dir RUN --producer-id ID --broker tcp://... --engine-url http://...
    slipstream train   --config RUN/config.json --run-dir RUN --broker tcp://... --engine-url http://...
    slipstream engine  --model DIR --port 0 --port-file F       (the embedded engine server)
    slipstream make-tiny-model DIR
    slipstream config [--markdown]                               (every config key, default and doc)

A bad config prints one line naming the key (no traceback) and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from pipeline.configbase import ConfigError

log = logging.getLogger("slipstream")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="resolved config (JSON, as written by 'slipstream run') or TOML")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slipstream", description="Asynchronous off-policy RL post-training.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="start and supervise every process of a run")
    r.add_argument("config", type=Path)
    r.add_argument("--run-dir", type=Path, default=None)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="validate the config and print it; start nothing")
    b = sub.add_parser("broker", help="run the queue broker")
    _common(b)
    p = sub.add_parser("produce", help="run one rollout producer")
    _common(p)
    p.add_argument("--producer-id", required=True)
    p.add_argument("--broker", required=True, help="broker producer endpoint, tcp://HOST:PORT")
    p.add_argument("--engine-url", action="append", required=True)
    t = sub.add_parser("train", help="run a trainer rank (under torchrun for several)")
    _common(t)
    t.add_argument("--broker", required=True, help="broker trainer endpoint, tcp://HOST:PORT")
    t.add_argument("--engine-url", action="append", required=True)
    sub.add_parser("engine", help="run the embedded engine server (see: slipstream engine --help)", add_help=False)
    m = sub.add_parser("make-tiny-model", help="write the tiny example's HF checkpoint")
    m.add_argument("out", type=Path)
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("config", help="print every config key with its default and doc")
    c.add_argument("--markdown", action="store_true")
    return ap


def _load(path: str | Path, overrides: list[str]) -> object:
    from pipeline.config import load_config

    return load_config(path, overrides)


def _cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.config import flag_overrides, load_config
    from pipeline.configbase import to_dict
    from pipeline.launcher import run
    from pipeline.logs import setup_logging

    cfg = load_config(args.config, [*args.set, *flag_overrides(extra)])
    setup_logging("launcher", cfg.run.log_level, cfg.run.log_format)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        print(f"config OK: {args.config}", file=sys.stderr)
        return 0
    run_dir = args.run_dir or Path(cfg.run.run_dir or f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return run(cfg, run_dir, args.config)


def _stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _run_async(main: object) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]


def _cmd_broker(args: argparse.Namespace) -> int:
    from pipeline.broker import Broker, run_broker
    from pipeline.logs import setup_logging
    from pipeline.metrics import serve_metrics
    from pipeline.rundir import port_file, stats_file, write_json_atomic

    cfg = _load(args.config, args.set)
    setup_logging("broker", cfg.run.log_level, cfg.run.log_format)  # type: ignore[attr-defined]

    async def main() -> None:
        vocab = _vocab_size(cfg.model.path)  # type: ignore[attr-defined]
        broker = Broker(cfg.queue, cfg.producer.group_size, vocab_size=vocab)  # type: ignore[attr-defined]
        metrics_port = 0
        if cfg.metrics.enabled:  # type: ignore[attr-defined]
            _, metrics_port = serve_metrics(broker.metrics.registry, cfg.metrics.host, 0)  # type: ignore[attr-defined]
        write_json_atomic(port_file(args.run_dir, "broker"), {"producer_port": broker.producer_port, "trainer_port": broker.trainer_port, "metrics_port": metrics_port})
        stop = _stop_event_on_signals(asyncio.get_running_loop())
        stats_file(args.run_dir, "broker").parent.mkdir(parents=True, exist_ok=True)
        await run_broker(broker, None, stats_file(args.run_dir, "broker"), stop)
        broker.close()

    _run_async(main())
    return 0


def _vocab_size(model_path: str) -> int | None:
    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError):
        log.warning("could not read vocab_size from %s/config.json: token ids are not range-checked", model_path)
        return None


def _cmd_produce(args: argparse.Namespace) -> int:
    from pipeline.logs import setup_logging
    from pipeline.metrics import serve_metrics
    from pipeline.rundir import port_file, stats_file, write_json_atomic
    from producers.producer import Producer, write_stats

    cfg = _load(args.config, args.set)
    setup_logging(args.producer_id, cfg.run.log_level, cfg.run.log_format)  # type: ignore[attr-defined]
    idx = int(args.producer_id.rsplit("-", 1)[-1]) if args.producer_id.rsplit("-", 1)[-1].isdigit() else 0

    async def main() -> None:
        producer = Producer(
            cfg.producer, args.producer_id, args.broker, args.engine_url, cfg.model.path,  # type: ignore[attr-defined]
            seed=cfg.run.seed * 7919 + idx, hwm=cfg.queue.socket_hwm, max_message_bytes=cfg.queue.max_message_bytes,  # type: ignore[attr-defined]
            peer_timeout_s=cfg.queue.peer_timeout_s, heartbeat_interval_s=cfg.queue.heartbeat_interval_s,  # type: ignore[attr-defined]
        )
        port = 0
        if cfg.metrics.enabled:  # type: ignore[attr-defined]
            _, port = serve_metrics(producer.metrics.registry, cfg.metrics.host, 0)  # type: ignore[attr-defined]
        write_json_atomic(port_file(args.run_dir, args.producer_id), {"metrics_port": port})
        stop = _stop_event_on_signals(asyncio.get_running_loop())
        try:
            await producer.run(stop, cfg.run.startup_timeout_s)  # type: ignore[attr-defined]
        finally:
            write_stats(stats_file(args.run_dir, args.producer_id), producer.final_stats())

    _run_async(main())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from consumers.loop import run_trainer
    from pipeline.logs import setup_logging

    cfg = _load(args.config, args.set)
    rank = os.environ.get("RANK", "0")
    setup_logging(f"trainer-{rank}", cfg.run.log_level, cfg.run.log_format)  # type: ignore[attr-defined]
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_trainer(cfg, args.run_dir, args.broker, args.engine_url)  # type: ignore[arg-type]


def _cmd_config(args: argparse.Namespace) -> int:
    from pipeline.config import SlipstreamConfig
    from pipeline.configbase import field_docs

    rows = field_docs(SlipstreamConfig)
    if args.markdown:
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for key, tp, default, text in rows:
            print(f"| `{key}` | {tp} | `{json.dumps(default)}` | {text} |")
    else:
        for key, tp, default, text in rows:
            print(f"{key} ({tp}, default {json.dumps(default)}): {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "engine":
        from producers.engine.server import main as engine_main

        return engine_main(argv[1:])
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command != "run" and extra:
            raise ConfigError(extra[0], "unrecognised argument")
        if args.command == "run":
            return _cmd_run(args, extra)
        if args.command == "broker":
            return _cmd_broker(args)
        if args.command == "produce":
            return _cmd_produce(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "make-tiny-model":
            from pipeline.tiny import make_tiny_model

            make_tiny_model(args.out, seed=args.seed)
            return 0
        if args.command == "config":
            return _cmd_config(args)
    except ConfigError as e:
        print(f"slipstream: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
