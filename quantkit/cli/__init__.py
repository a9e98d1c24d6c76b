"""Command line: ``quantkit {run,quantize,calibrate,eval,report,inspect,estimate,lm-eval} ...``.

``quantkit CMD --help`` explains each. Every error a user can cause ends as one line
``quantkit: error: ...`` with exit status 2 (a traceback only with ``--verbose``); Ctrl-C and
SIGTERM leave no partial output behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from ..errors import QuantkitError
from .commands import COMMANDS
from .parser import build_parser

__all__ = ["build_parser", "main"]

log = logging.getLogger("quantkit")


def _setup_logging(args: argparse.Namespace) -> bool:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"  # and the bars of libraries below (compressed-tensors, lm_eval)
    return not args.quiet


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that every ``with`` block cleans up as on Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = _setup_logging(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        rc = COMMANDS[args.command](args, progress)
    except QuantkitError as e:
        if args.verbose:
            log.debug("traceback", exc_info=True)
        print(f"quantkit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a path that vanished: the user's to fix
        if args.verbose:
            log.debug("traceback", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        reason = (str(e.strerror or e).strip().splitlines() or [type(e).__name__])[0]
        print(f"quantkit: error: {where}{reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantkit: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except _Terminated:
        print("quantkit: terminated (SIGTERM); no partial output was left behind", file=sys.stderr)
        return 143
    except Exception as e:
        if args.verbose:
            raise
        reason = (str(e).strip().splitlines() or [""])[0]
        print(
            f"quantkit: error: unexpected {type(e).__name__}: {reason} (rerun with --verbose for the traceback, "
            "and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return rc or 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
