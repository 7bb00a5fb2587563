"""Command line: ``embresume demo | bench | doctor``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="embresume", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="cmd", required=True)
    from . import demo
    demo.add_arguments(sub.add_parser("demo", help="encoder + language process on this host, verified"))
    sub.add_parser("bench", help="benchmarks of every available path (args: see `embresume bench --help`)",
                   add_help=False)
    sub.add_parser("doctor", help="what this machine supports (shm, CUDA IPC, Mooncake/RDMA)")
    if argv and argv[0] == "bench":
        from .bench.run import main as bench_main
        return bench_main(argv[1:]) or 0
    args = p.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "demo":
        return demo.run(args)
    if args.cmd == "doctor":
        from .doctor import run as doctor_run
        return doctor_run()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
