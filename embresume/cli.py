"""Command line: ``embresume demo | bench | doctor``."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import socket
import sys
from typing import Optional
from urllib.parse import urlsplit

DESCRIPTION = """\
Resumable transfer of variable-length multimodal embeddings from an encoder
process to a language-model process (same host: POSIX shared memory or CUDA
IPC; across hosts: Mooncake).  Run "embresume COMMAND --help" for a
command's options."""

LOG_LEVELS = ("debug", "info", "warning", "error")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is exactly one line on stderr (exit 2), and a
    value that starts with a minus and a digit (``--pool-bytes -1M``) is a value
    to check, not an unknown option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d[\w.]*$|^-\.\d[\w.]*$")

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"embresume: error: {message}\n")


# ---------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    try:
        v = int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def int_arg(text: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


DTYPE_NAMES = ("bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float", "float64")


def dtype_arg(text: str) -> str:
    key = text.lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPE_NAMES)}")
    return key


def size_arg(text: str) -> int:
    from .config import parse_size
    from .errors import ConfigError
    try:
        return parse_size(text, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_endpoint(text: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); ArgumentTypeError otherwise."""
    bad = argparse.ArgumentTypeError(f"expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:17600), got {text!r}")
    if not isinstance(text, str) or not text.startswith("tcp://"):
        raise bad
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError:
        raise bad from None
    if not u.hostname or port is None or not 0 < port < 65536 or u.path not in ("", "/") or u.query:
        raise bad
    return u.hostname, port


def local_endpoint(text: str) -> str:
    """An endpoint this host can bind now (the demo's encoder binds it)."""
    host, port = parse_endpoint(text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise argparse.ArgumentTypeError(f"cannot resolve host {host!r} of {text}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ does
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise argparse.ArgumentTypeError(f"port {port} on {host} is already in use; pick another "
                                                 "(or leave --endpoint out for a free port)") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise argparse.ArgumentTypeError(f"{host} is not an address of this host") from None
            raise argparse.ArgumentTypeError(f"cannot bind {text}: {e.strerror}") from None
    return text


# ---------------------------------------------------------------- parser
def _common() -> argparse.ArgumentParser:
    """-v / --log-level, accepted after the command too."""
    c = ArgumentParser(add_help=False)
    g = c.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-v: info, -vv: debug, also Mooncake's own log)")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=None, type=str.lower,
                   help="log level of embresume's messages (default: warning)")
    return c


def build_parser() -> ArgumentParser:
    from . import __version__
    common = _common()
    p = ArgumentParser(prog="embresume", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"embresume {__version__}",
                   help="print the version and exit")
    # the same flags before the command, under other names (argparse would reset them otherwise)
    p.add_argument("-v", "--verbose", dest="g_verbose", action="count", default=0,
                   help="more log output (-v: info, -vv: debug); also accepted after the command")
    p.add_argument("--log-level", dest="g_log_level", choices=LOG_LEVELS, default=None, type=str.lower,
                   help="log level of embresume's messages (default: warning)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=ArgumentParser, title="commands")
    from . import demo
    d = sub.add_parser("demo", parents=[common], help="an encoder and a language process on this host, verified",
                       description=demo.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)
    from .bench import run as bench_run
    b = sub.add_parser("bench", parents=[common], help="benchmarks of every transfer path of this machine",
                       description=bench_run.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_run.add_arguments(b, verbose=False)
    sub.add_parser("doctor", parents=[common], help="what this machine supports (shm budget, CUDA IPC, Mooncake)",
                   description="Checks what this machine supports: the shared-memory budget of the default pool, "
                               "CUDA IPC, Mooncake and RDMA devices.")
    return p


def _log_level(args) -> int:
    if args.log_level:
        return getattr(logging, args.log_level.upper())
    return [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]


def set_mooncake_log_level(verbose: int) -> None:
    """Mooncake's own (glog) log level from -v; the user's MC_LOG_LEVEL wins.

    Without -v nothing is set: the Mooncake transport's default (ERROR, its
    glog lines silenced) applies.  Must run before anything imports mooncake;
    spawned children inherit the environment.
    """
    if verbose >= 2:
        os.environ.setdefault("MC_LOG_LEVEL", "INFO")
    elif verbose == 1:
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")


def parse_args(argv: list[str], parser: Optional[ArgumentParser] = None) -> argparse.Namespace:
    """Parse ``argv``; the global flags given before and after the command are merged
    (``args.verbose``: the -v count, ``args.log_level``: the level name or None)."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    args.verbose = getattr(args, "verbose", 0) + args.g_verbose
    args.log_level = getattr(args, "log_level", None) or args.g_log_level
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """The ``embresume`` command.  A Ctrl-C anywhere (imports included) is one
    line and exit 130; a SIGTERM is cleaned up after the same way, one line and
    exit 143 (128 + SIGTERM)."""
    from .procutil import sigterm_interrupts
    with sigterm_interrupts() as term:
        try:
            rc = _main(argv)
        except KeyboardInterrupt as e:
            rc = _interrupted(e)
    if term.hit and rc == 130:   # a command that reported the interruption itself (the bench)
        rc = 143
    return rc


def _interrupted(e: KeyboardInterrupt) -> int:
    """The one line and the exit status of a Ctrl-C (130) or a SIGTERM (143)."""
    from .procutil import Terminated
    if isinstance(e, Terminated):
        print("embresume: terminated (SIGTERM)", file=sys.stderr)
        return 143
    print("embresume: interrupted", file=sys.stderr)
    return 130


class _SignalsDeferred:
    """A Ctrl-C or a SIGTERM during the block (torch's import: an import cut
    short can leave the interpreter slow to exit) takes effect right after it,
    as KeyboardInterrupt (a SIGTERM: through the handler in force, Terminated)."""

    def __enter__(self):
        import signal
        import threading
        self.hits: list[int] = []
        self.old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if signum not in self.hits:
            self.hits.append(signum)

    def __exit__(self, *exc) -> None:
        import signal
        for sig, old in self.old.items():
            signal.signal(sig, old)
        if exc[0] is None:
            if signal.SIGTERM in self.hits:
                signal.raise_signal(signal.SIGTERM)   # the handler in force now: Terminated, at once
            if signal.SIGINT in self.hits:
                raise KeyboardInterrupt


def _main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with _SignalsDeferred():
        p = build_parser()   # imports torch (the bench's options)
    if not argv:
        p.print_help()
        return 0
    args = parse_args(argv, p)
    if args.cmd is None:
        p.print_help()
        return 0
    verbose = args.verbose
    level = _log_level(args)
    set_mooncake_log_level(verbose if level > logging.DEBUG else max(verbose, 2))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embresume").setLevel(level)
    try:
        if args.cmd == "demo":
            from . import demo
            return demo.run(args)
        if args.cmd == "bench":
            from .bench import run as bench_run
            return bench_run.run(args)
        if args.cmd == "doctor":
            from .doctor import run as doctor_run
            return doctor_run()
    except KeyboardInterrupt as e:
        return _interrupted(e)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
