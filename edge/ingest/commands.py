"""``edge serve`` and ``edge replay``: argument parsing and calls into the library, nothing more.

:func:`add_parsers` adds both subcommands to the ``edge`` CLI's subparsers;
:func:`main` runs them standalone (``python -m edge.ingest.commands serve ...``).
"""

import argparse
import logging
import signal
import sys
import threading

from edge.errors import EdgeError, report_user_error

log = logging.getLogger(__name__)


def _apply_log_level(level: str) -> None:
    """The config's level for the ``edge`` loggers (records propagate to the root's handlers)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("edge").setLevel(level)


def cmd_serve(args) -> int:
    """Run the service until SIGTERM / SIGINT, then drain."""
    from edge.config import load_config
    from edge.ingest.service import EdgeService

    config = load_config(args.config)
    _apply_log_level(config.logging.level)
    service = EdgeService(config)

    def on_signal(signum, frame):
        log.info("signal %d: draining", signum)
        service.request_stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    service.start()
    if service.scp is not None:
        print(f"listening as {config.scp.ae_title} on {config.scp.host}:{service.scp_port}", flush=True)
    return service.run()


def _host_port(text: str):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise EdgeError(f"--to must be HOST:PORT, got {text!r}")
    return host, int(port)


def cmd_replay(args) -> int:
    """Replay a folder by C-STORE (--to) or into a local pipeline (--config)."""
    from edge.ingest.replay import replay_cstore, replay_local, replay_order

    files, skipped = replay_order(args.dir)
    if skipped:
        print(f"{len(skipped)} non-DICOM file(s) skipped", flush=True)
    if not files:
        raise EdgeError(f"{args.dir}: no DICOM files to replay")
    if args.to:
        host, port = _host_port(args.to)
        report = replay_cstore(files, host, port, called_ae=args.called_ae, calling_ae=args.calling_ae,
                               rate=args.rate, associations=args.associations)
    else:
        from edge.config import load_config
        from edge.ingest.service import EdgeService

        config = load_config(args.config)
        _apply_log_level(config.logging.level)
        service = EdgeService(config).start(receive=False)
        try:
            report = replay_local(files, service.intake, rate=args.rate)
            service.drain()
            summary = service.pipeline.latency.summary()
        finally:
            service.close()
        for stage, s in summary.items():
            print(f"  {stage:<14} p50 {s['p50_ms']:8.2f} ms   p99 {s['p99_ms']:8.2f} ms   (n={s['n']})")
        print(f"results in {config.outputs.dir}")
    print(f"{report.sent} sent in {report.elapsed_s:.1f} s ({report.rate:.1f}/s), {report.stored} stored, "
          f"{report.retries} retried, {len(report.failures)} failed", flush=True)
    for uid, status, comment in report.failures[:10]:
        print(f"  {uid}: 0x{status & 0xFFFF:04X} {comment}")
    return 0 if not report.failures else 2


def add_parsers(subparsers) -> None:
    """Add ``serve`` and ``replay`` to the ``edge`` command's subparsers."""
    s = subparsers.add_parser("serve", help="run the runtime: DICOM SCP / watched folder -> detection -> results")
    s.add_argument("--config", required=True, help="TOML config file (see edge.example.toml)")
    s.set_defaults(func=cmd_serve)

    r = subparsers.add_parser("replay", help="replay a folder of series as a scanner would")
    r.add_argument("dir", help="folder of DICOM series (any layout)")
    r.add_argument("--rate", type=float, default=None, help="slices per second (default: as fast as possible)")
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="HOST:PORT", help="C-STORE to a running SCP (e.g. 127.0.0.1:11112)")
    target.add_argument("--config", help="run a local pipeline with this config instead (no network)")
    r.add_argument("--called-ae", default="CT_EDGE", help="the SCP's AE title (default: %(default)s)")
    r.add_argument("--calling-ae", default="CT_REPLAY", help="our AE title (default: %(default)s)")
    r.add_argument("--associations", type=int, default=1, help="concurrent associations (default: %(default)s)")
    r.set_defaults(func=cmd_replay)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edge-ingest")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgeError as e:
        return report_user_error(e)


if __name__ == "__main__":
    sys.exit(main())
