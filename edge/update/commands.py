"""``edge update apply|status|rollback|trust``: argument parsing over :class:`edge.update.installer.Installer`.

Wire into ``edge/cli.py`` with ``edge.update.commands.add_parsers(sub)``.
"""

import argparse
import json
import os

from edge.update.installer import DEFAULT_STATE_DIR, Installer

STATE_DIR_ENV = "CT_EDGE_STATE_DIR"


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--state-dir", default=os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR),
                   help=f"device update state folder (default: ${STATE_DIR_ENV} or %(default)s)")
    p.add_argument("--trust", metavar="FILE", help="trust store (default: STATE_DIR/trusted_keys.json)")
    p.add_argument("--hardware", action="append", metavar="TAG",
                   help="this device's hardware tag (repeatable; default: STATE_DIR/device.json or detected)")
    return p


def add_parsers(subparsers) -> None:
    """Add the ``update`` command and its sub-commands to an argparse sub-parser set."""
    common = _common()
    u = subparsers.add_parser("update", help="install signed model bundles: apply, status, rollback, trust")
    us = u.add_subparsers(dest="update_command", required=True)

    a = us.add_parser("apply", parents=[common], help="verify, prepare, golden-check and switch to a bundle")
    a.add_argument("bundle", help="bundle file (.tar or .tar.gz made by tools/package_update.py)")
    a.add_argument("--force", action="store_true", help="re-install a release equal to the installed one")
    a.set_defaults(func=cmd_update_apply)

    s = us.add_parser("status", parents=[common], help="active and previous versions, as JSON")
    s.add_argument("--no-verify", action="store_true", help="do not re-hash the installed files")
    s.set_defaults(func=cmd_update_status)

    r = us.add_parser("rollback", parents=[common], help="switch back to the previous version")
    r.set_defaults(func=cmd_update_rollback)

    t = us.add_parser("trust", parents=[common], help="apply a key rotation statement to the trust store")
    t.add_argument("rotation", help="rotation file made by tools/package_update.py rotate")
    t.set_defaults(func=cmd_update_trust)


def _installer(args) -> Installer:
    device = None
    if args.hardware:
        from edge.update.device import detect_device

        device = detect_device(args.state_dir, hardware=args.hardware)
    return Installer(args.state_dir, trust_store=args.trust, device=device)


def cmd_update_apply(args) -> int:
    print(_installer(args).apply(args.bundle, force=args.force).format())
    return 0


def cmd_update_status(args) -> int:
    installer = _installer(args)
    status = installer.status(verify=not args.no_verify).to_dict()
    status["device"] = installer.device.to_dict()
    print(json.dumps(status, indent=2))
    current = status["current"]
    return 0 if current and current["verified"] is not False and not status["pending"] else 1


def cmd_update_rollback(args) -> int:
    print(_installer(args).rollback().format())
    return 0


def cmd_update_trust(args) -> int:
    store = _installer(args).trust(args.rotation)
    print(f"trust store updated (rotation {store.rotation_sequence}): trusted keys {', '.join(sorted(store.keys))}")
    return 0
