"""The ``slipstream`` command line.

    slipstream run CONFIG.toml [--run-dir DIR] [--set key=value ...] [--megatron-KEY V] [--sglang-KEY V] [--dry-run]
    slipstream broker  --config RUN/config.json --run-dir RUN
    slipstream produce --config RUN/config.json --run-dir RUN --producer-id ID --broker tcp://... --engine-url http://...
    slipstream train   --config RUN/config.json --run-dir RUN --broker tcp://... --engine-url http://...
    slipstream record  --config RUN/config.json --run-dir RUN --broker tcp://... --engine-url http://...   (run.mode = rollout_only)
    slipstream replay  --config RUN/config.json --run-dir RUN --broker tcp://...                         (run.mode = train_only)
    slipstream engine  --model DIR --port 0 --port-file F       (the embedded engine server)
    slipstream make-tiny-model DIR
    slipstream make-model DIR --preset qwen3-0.6b                (random weights of an architecture preset)
    slipstream keys DIR                                          (CURVE server + client certificates)
    slipstream config [--markdown]                               (every config key, default and doc)
    slipstream bench queue|async|all [--out DIR]                 (benchmarks; JSON under bench/results)
    slipstream bench e2e CONFIG [--steps 30] [--staleness 0,2]   (the whole job at each max_staleness, side by side)
    slipstream dashboard [--check]                               (write / check ops/grafana/slipstream.json)
    slipstream scrape-config RUN_DIR [--out F] [--rules R.yml]   (Prometheus config for a run)
    slipstream status RUN_DIR [--once]                           (one-screen view of a running or finished job)
    slipstream sweep CONFIG --max-staleness 0,1,2 [--seeds 0,1] [--set ...] [--parallel N]   (pipeline/sweep.py)
    slipstream --version

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
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.configbase import ConfigError

if TYPE_CHECKING:
    from pipeline.config import SlipstreamConfig
    from pipeline.runconfig import MetricsConfig, ModelConfig, QueueConfig, RunConfig
    from producers.config import ProducerConfig

log = logging.getLogger("slipstream")


RUN_EPILOG = """pass-through flags (any number, after the config):
  --megatron-KEY VALUE   same as --set trainer.megatron.KEY=VALUE: a field of megatron-core's
                         TransformerConfig, OptimizerConfig or DistributedDataParallelConfig
                         (dashes become underscores), e.g. --megatron-recompute-granularity full
  --sglang-KEY VALUE     same as --set producer.sglang.KEY=VALUE: a flag of the SGLang servers
                         slipstream launches (producer.engine = "sglang"), checked against
                         SGLang's ServerArgs, e.g. --sglang-mem-fraction-static 0.8

every config key, its default and meaning: slipstream config"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="resolved config (JSON, as written by 'slipstream run') or TOML")
    p.add_argument("--run-dir", required=True, type=Path, help="the run directory (ports/, stats/, logs/ ... are written there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")


def _parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    ap = argparse.ArgumentParser(prog="slipstream", description="Asynchronous off-policy RL post-training.")
    ap.add_argument("--version", action="version", version=f"slipstream {__version__} (Python {sys.version.split()[0]})")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="start and supervise every process of a run", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", type=Path, help="the run's TOML config (e.g. examples/tiny/config.toml)")
    r.add_argument("--run-dir", type=Path, default=None, help="run directory (default: run.run_dir, else runs/<run.name>-<timestamp>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable); VALUE is a TOML literal")
    r.add_argument("--dry-run", action="store_true",
                   help="validate the config, resolve the model (config + tokenizer) and import every plug-in; print the config and the placement plan; start nothing")
    b = sub.add_parser("broker", help="run the queue broker")
    _common(b)
    b.add_argument("--metrics-port", type=int, default=0, help="metrics port (0 = any free port; a restart reuses the first)")
    p = sub.add_parser("produce", help="run one rollout producer")
    _common(p)
    p.add_argument("--producer-id", required=True, help="producer name, producer-N (N picks its seed and prompt shard)")
    p.add_argument("--broker", required=True, help="broker producer endpoint, tcp://HOST:PORT")
    p.add_argument("--engine-url", action="append", required=True, help="engine base URL to generate with (repeatable)")
    t = sub.add_parser("train", help="run a trainer rank (under torchrun for several)")
    _common(t)
    t.add_argument("--broker", required=True, help="broker trainer endpoint, tcp://HOST:PORT")
    t.add_argument("--engine-url", action="append", default=[],
                   help="engine base URL to publish weights to (repeatable; none with run.mode = 'train_only')")
    # torchrun across nodes without Ray (pipeline/multinode.py): outside torchrun, these re-run the command under it
    t.add_argument("--nnodes", type=int, default=None, help="nodes of this trainer (re-runs itself under torchrun on this node)")
    t.add_argument("--node-rank", type=int, default=0, help="this node's rank among --nnodes (0 = the rendezvous host)")
    t.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the c10d rendezvous (node rank 0), with --nnodes > 1")
    t.add_argument("--rdzv-id", default="slipstream", help="rendezvous id, the same on every node")
    t.add_argument("--nproc-per-node", type=int, default=1, help="trainer ranks on this node, with --nnodes")
    rec = sub.add_parser("record", help="run.mode = 'rollout_only': record each step's batch in the trainer's place (pipeline/record.py)")
    _common(rec)
    rec.add_argument("--broker", required=True, help="broker trainer endpoint, tcp://HOST:PORT")
    rec.add_argument("--engine-url", action="append", default=[], help="engine base URL (repeatable)")
    rep = sub.add_parser("replay", help="run.mode = 'train_only': send a recording to the broker in the producers' place (pipeline/record.py)")
    _common(rep)
    rep.add_argument("--broker", required=True, help="broker producer endpoint, tcp://HOST:PORT")
    sub.add_parser("engine", help="run the embedded engine server (see: slipstream engine --help)", add_help=False)
    k = sub.add_parser("keys", help="make CURVE keys: a server and a client certificate (for a non-loopback queue.host)")
    k.add_argument("out", type=Path, help="directory for the certificates")
    m = sub.add_parser("make-tiny-model", help="write the tiny example's HF checkpoint")
    m.add_argument("out", type=Path, help="checkpoint directory to write")
    m.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    mm = sub.add_parser("make-model", help="write a random-initialised HF checkpoint of an architecture preset (pipeline/presets.py)")
    mm.add_argument("out", type=Path, help="checkpoint directory to write")
    mm.add_argument("--preset", required=True, help="tiny, qwen3-0.6b, qwen3-1.7b, qwen3-4b or qwen3-8b")
    mm.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    c = sub.add_parser("config", help="print every config key with its default and doc")
    c.add_argument("--markdown", action="store_true", help="print the README's config table")
    bn = sub.add_parser("bench", help="run benchmarks (baseline side by side) and write JSON to bench/results")
    bn.add_argument("which", choices=["queue", "async", "e2e", "engine", "all"],
                    help="which benchmark (engine: the embedded engine vs transformers generate; its own options: "
                         "slipstream bench engine --help)")
    bn.add_argument("config", nargs="?", type=Path, default=None, help="e2e: the run's config (e.g. examples/gpu/one_gpu.toml)")
    bn.add_argument("--groups", type=int, default=2000, help="queue: groups of 8 trajectories to move")
    bn.add_argument("--steps", type=int, default=None, help="async: trainer steps per run (60); e2e: the same (30)")
    bn.add_argument("--staleness", default="0,2", help="e2e: comma-separated max_staleness values, the first is the baseline")
    bn.add_argument("--max-run-seconds", type=float, default=3600.0, help="e2e: interrupt a run after this long (compare the steps done)")
    bn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e2e: config override for every run")
    bn.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")),
                    help="directory for the result JSON (default $OUT, else bench/results)")
    _add_ops_commands(sub)
    _add_sweep_command(sub)
    return ap


def _add_sweep_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sw = sub.add_parser("sweep", help="run the job once per max_staleness and seed; write sweep.json, PNG plots and an HTML report")
    sw.add_argument("config", type=Path, nargs="?", default=None)
    sw.add_argument("--max-staleness", default=None, metavar="0,1,2", help="comma-separated η values")
    sw.add_argument("--seeds", default="0", metavar="0,1", help="comma-separated run.seed values (default 0)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every run (repeatable)")
    sw.add_argument("--parallel", type=int, default=1, help="runs at once (default 1; each run uses every process of a job)")
    sw.add_argument("--sweep-dir", type=Path, default=None, help="default runs/<name>-<timestamp>; an existing one is continued")
    sw.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the sweep in DIR (its plan, finished runs kept)")
    sw.add_argument("--name", default="", help="sweep name (tracking.group of every run); default sweep-<config name>")
    sw.add_argument("--target-reward", type=float, default=None, help="reward the time-to-target counts to (default 0.8 x the best final reward)")
    sw.add_argument("--marks", default="", metavar="10,20,30", help="wall-clock marks (s) to report the reward at (default: 4 up to the shortest run)")
    sw.add_argument("--smooth", type=int, default=10, help="steps in the trailing reward mean (default 10)")


def _add_ops_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("dashboard", help="write the Grafana dashboard generated from code (--check: verify it)")
    d.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale, conflicted or uses unknown metrics")
    d.add_argument("--path", type=Path, default=None, help="dashboard file (default ops/grafana/slipstream.json)")
    s = sub.add_parser("scrape-config", help="write a Prometheus scrape config for a run from RUN_DIR/processes.json")
    s.add_argument("run_dir", type=Path, help="the run directory (reads processes.json)")
    s.add_argument("--out", type=Path, default=None, help="default RUN_DIR/prometheus.yml")
    s.add_argument("--interval", type=float, default=1.0, help="scrape interval in seconds")
    s.add_argument("--rules", type=Path, action="append", default=[], help="rule file to load (repeatable)")
    st = sub.add_parser("status", help="one-screen view of a running job (from RUN_DIR/processes.json)")
    st.add_argument("run_dir", type=Path, help="the run directory (running: scrapes its processes; finished: reads summary.json)")
    st.add_argument("--once", action="store_true", help="print once and exit (default: refresh every 2 s)")
    st.add_argument("--interval", type=float, default=2.0, help="refresh interval in seconds")


def _cmd_ops(args: argparse.Namespace) -> int:
    if args.command == "dashboard":
        from pipeline.dashboard import DASHBOARD_PATH
        from pipeline.dashboard import main as dashboard_main

        return dashboard_main(args.check, args.path or DASHBOARD_PATH)
    if args.command == "scrape-config":
        from pipeline.status import write_scrape_config

        try:
            out = write_scrape_config(args.run_dir, args.out, args.interval, args.rules)
        except (FileNotFoundError, ValueError) as e:
            print(f"slipstream scrape-config: {e}", file=sys.stderr)
            return 1
        print(out)
        return 0
    from pipeline.status import main as status_main

    return status_main(args.run_dir, args.once, args.interval)


def _load(path: str | Path, overrides: list[str]) -> SlipstreamConfig:
    """The whole config, every section and the cross-role checks (the trainer and the recorder
    read most sections, and the tracker logs all of them)."""
    from pipeline.config import load_config

    return load_config(path, overrides)


def role_sections(
    path: str | Path, overrides: list[str]
) -> tuple[RunConfig, ModelConfig, QueueConfig, MetricsConfig, ProducerConfig]:
    """The sections the broker and the producer processes read (``[run]``, ``[model]``,
    ``[queue]``, ``[metrics]``, ``[producer]``), and only those: neither loads the trainer's or the
    engine's config module (pipeline/runconfig.py says why; ``slipstream run`` checked the whole
    config before it started them)."""
    from pipeline.runconfig import (
        MetricsConfig,
        ModelConfig,
        QueueConfig,
        RunConfig,
        load_config_dict,
        load_sections,
    )
    from producers.config import ProducerConfig

    run, model, queue, metrics, producer = load_sections(
        load_config_dict(path, overrides), run=RunConfig, model=ModelConfig, queue=QueueConfig, metrics=MetricsConfig,
        producer=ProducerConfig)
    return run, model, queue, metrics, producer


def _cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    from pipeline.config import flag_overrides, load_config
    from pipeline.configbase import to_dict
    from pipeline.launcher import run
    from pipeline.logs import setup_logging
    from pipeline.placement import plan_for

    cfg = load_config(args.config, [*args.set, *flag_overrides(extra)])
    base = Path(args.config).resolve().parent  # run.python_path entries are relative to the config file
    cfg.run.python_path = [str((base / p).resolve()) for p in cfg.run.python_path]
    setup_logging("launcher", cfg.run.log_level, cfg.run.log_format)
    plan = plan_for(cfg)  # ConfigError (exit 2) on a placement that cannot work
    if cfg.run.mode == "train_only":
        from pipeline.record import check_recording

        check_recording(cfg.run.replay_from, cfg.run.steps)  # every file there and intact, or one error naming it
    if args.dry_run:
        from pipeline.preflight import preflight

        checked = preflight(cfg)
        print(json.dumps(to_dict(cfg), indent=2))
        for line in checked:
            print(f"checked {line}", file=sys.stderr)
        print(plan.format(), file=sys.stderr)
        print(f"config OK: {args.config}", file=sys.stderr)
        return 0
    run_dir = args.run_dir or Path(cfg.run.run_dir or f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.run.launcher == "ray":  # the roles placed on a Ray cluster (pipeline/ray_launcher.py)
        from pipeline.ray_launcher import run_ray

        return run_ray(cfg, run_dir, args.config, plan)
    return run(cfg, run_dir, args.config, plan)


def _stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _run_async(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _cmd_broker(args: argparse.Namespace) -> int:
    from pipeline.broker import Broker, run_broker
    from pipeline.logs import setup_logging
    from pipeline.metrics import serve_metrics
    from pipeline.rundir import port_file, stats_file, write_json_atomic

    run, model, queue, metrics, producer = role_sections(args.config, args.set)
    setup_logging("broker", run.log_level, run.log_format)

    async def main() -> None:
        vocab = _vocab_size(model.path)
        journal = args.run_dir / "journal" if queue.journal else None
        broker = Broker(queue, producer.group_size, vocab_size=vocab, journal_dir=journal, acked_dir=args.run_dir / "acked")
        metrics_port = 0
        if metrics.enabled:
            _, metrics_port = serve_metrics(broker.metrics.registry, metrics.host, args.metrics_port)
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
    from pipeline.transport import CurveKeys
    from producers.producer import Producer, write_stats

    run, model, queue, metrics, producer_cfg = role_sections(args.config, args.set)
    setup_logging(args.producer_id, run.log_level, run.log_format)
    idx = int(args.producer_id.rsplit("-", 1)[-1]) if args.producer_id.rsplit("-", 1)[-1].isdigit() else 0

    async def main() -> None:
        producer = Producer(
            producer_cfg, args.producer_id, args.broker, args.engine_url, model.path,
            seed=run.seed * 7919 + idx, hwm=queue.socket_hwm, max_message_bytes=queue.max_message_bytes,
            peer_timeout_s=queue.peer_timeout_s, heartbeat_interval_s=queue.heartbeat_interval_s,
            acked_log=args.run_dir / "acked" / "client" / f"{args.producer_id}.jsonl",  # the broker writes acked/ itself
            curve=CurveKeys.from_config(queue),
            eval_path=args.run_dir / "eval.jsonl" if idx == 0 else None,
            cursor_path=args.run_dir / "cursors" / f"{args.producer_id}.json",
            stats_path=stats_file(args.run_dir, args.producer_id),  # rewritten before each first send: exact after a SIGKILL
        )
        port = 0
        if metrics.enabled:
            _, port = serve_metrics(producer.metrics.registry, metrics.host, 0)
        write_json_atomic(port_file(args.run_dir, args.producer_id), {"metrics_port": port})
        stop = _stop_event_on_signals(asyncio.get_running_loop())
        try:
            await producer.run(stop, run.startup_timeout_s)
        finally:
            write_stats(stats_file(args.run_dir, args.producer_id), producer.final_stats())

    _run_async(main())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from consumers.loop import Trainer
    from pipeline.logs import setup_logging

    cfg = _load(args.config, args.set)
    rank = os.environ.get("RANK", "0")
    setup_logging(f"trainer-{rank}", cfg.run.log_level, cfg.run.log_format)
    torch.set_num_threads(1)
    trainer = Trainer(cfg, args.run_dir, args.broker, args.engine_url)

    def on_signal(signum: int, _frame: Any) -> None:
        if trainer.stop_signal is not None:  # a second signal: do not wait for the step and the checkpoint
            sys.exit(128 + signum)
        trainer.request_stop(signum)  # stops at the next step boundary, then the final checkpoint

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return trainer.run()


def _cmd_bench_e2e(args: argparse.Namespace, command: str) -> int:
    from pipeline.bench_e2e import run_e2e
    from pipeline.logs import setup_logging

    if args.config is None:
        raise ConfigError("bench e2e", "needs the run's config: slipstream bench e2e CONFIG [--steps N] [--staleness 0,2]")
    try:
        etas = [int(x) for x in args.staleness.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--staleness", f"expected comma-separated integers, got {args.staleness!r}") from None
    if not etas or min(etas) < 0:
        raise ConfigError("--staleness", f"expected max_staleness values >= 0, got {args.staleness!r}")
    setup_logging("bench", "INFO", "text")
    result = run_e2e(args.config, args.steps or 30, etas, args.out, command, args.set, args.max_run_seconds)
    return 0 if all(r["exit_code"] == 0 for r in result["runs"].values()) else 1


def _cmd_record_replay(args: argparse.Namespace) -> int:
    from pipeline.logs import setup_logging
    from pipeline.record import Replayer, run_recorder
    from pipeline.rundir import port_file, stats_file, write_json_atomic

    cfg = _load(args.config, args.set)
    name = "recorder" if args.command == "record" else "replayer-0"
    setup_logging(name, cfg.run.log_level, cfg.run.log_format)
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stopping.append(s))
    if args.command == "record":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return run_recorder(cfg, args.run_dir, args.broker, args.engine_url)
    replayer = Replayer(cfg, cfg.run.replay_from, args.broker)
    write_json_atomic(port_file(args.run_dir, name), {"metrics_port": 0})
    last = time.monotonic()

    def stop() -> bool:
        nonlocal last
        if time.monotonic() - last >= 2.0:  # so a killed replayer's counts survive into summary.json
            write_json_atomic(stats_file(args.run_dir, name), replayer.stats)
            last = time.monotonic()
        return bool(stopping)

    try:
        replayer.run(stop)
    finally:
        write_json_atomic(stats_file(args.run_dir, name), replayer.stats)
        replayer.close()
    return 0


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
    if argv[:2] == ["bench", "engine"]:
        from producers.engine.bench import main as engine_bench

        return engine_bench(argv[2:], command="slipstream " + " ".join(argv))
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command not in ("run", "sweep") and extra:
            raise ConfigError(extra[0], "unrecognised argument")
        if args.command == "run":
            return _cmd_run(args, extra)
        if args.command == "sweep":
            from pipeline.sweep import main as sweep_main

            return sweep_main(args, extra, "slipstream " + " ".join(argv))
        if args.command == "broker":
            return _cmd_broker(args)
        if args.command == "produce":
            return _cmd_produce(args)
        if args.command == "train":
            if args.nnodes is not None and "RANK" not in os.environ:  # this node's ranks under torchrun
                from pipeline.multinode import reexec_argv

                if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
                    raise ConfigError("--node-rank", f"must be in [0, --nnodes = {args.nnodes}), got {args.node_rank}")
                if args.nnodes > 1 and ":" not in args.rdzv_endpoint:
                    raise ConfigError("--rdzv-endpoint", "must be HOST:PORT (node rank 0's address) with --nnodes > 1")
                cmd = reexec_argv(argv, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.nproc_per_node)
                os.execv(cmd[0], cmd)
            return _cmd_train(args)
        if args.command in ("record", "replay"):
            return _cmd_record_replay(args)
        if args.command == "keys":
            from pipeline.transport import make_keys

            keys = make_keys(args.out)
            print(f"wrote {args.out}: set queue.curve_server_key = {keys['server_secret']!r} (broker; producers and trainers "
                  f"may use the public {keys['server_public']!r}) and queue.curve_client_key = {keys['client_secret']!r}")
            return 0
        if args.command == "make-tiny-model":
            from pipeline.tiny import make_tiny_model

            make_tiny_model(args.out, seed=args.seed)
            return 0
        if args.command == "make-model":
            from pipeline.presets import PRESETS, make_model

            if args.preset not in PRESETS:
                raise ConfigError("--preset", f"must be one of {list(PRESETS)}, got {args.preset!r}")
            make_model(args.out, args.preset, seed=args.seed)
            return 0
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "bench":
            from pipeline import bench

            command = "slipstream " + " ".join(argv)
            if args.which == "e2e":
                return _cmd_bench_e2e(args, command)
            if args.which in ("queue", "all"):
                bench.run_queue(args.groups, args.out, command)
            if args.which in ("async", "all"):
                bench.run_async(args.steps or 60, args.out, command)
            return 0
        if args.command in ("dashboard", "scrape-config", "status"):
            return _cmd_ops(args)
    except ConfigError as e:
        print(f"slipstream: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
