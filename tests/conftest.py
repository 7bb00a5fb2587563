import gc
import glob
import os
import sys
import time

import pytest

# ---------------------------------------------------------------- which embresume is tested
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: EMBRESUME_TEST_INSTALLED=1: the suite tests the installed package (CI: the wheel in a fresh
#: virtual environment), never this checkout.  ``python -m pytest`` from the repository root puts
#: the root first on the path, where the checkout's embresume/ folder would win: take it off, and
#: keep it off in every process the tests start (PYTHONSAFEPATH, inherited).
TEST_INSTALLED = os.environ.get("EMBRESUME_TEST_INSTALLED") == "1"
if TEST_INSTALLED:
    os.environ["PYTHONSAFEPATH"] = "1"
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != REPO]

import embresume  # noqa: E402

#: the folder the embresume under test was imported from
PACKAGE_DIR = os.path.dirname(os.path.abspath(embresume.__file__))
#: True when that is this checkout (README's editable install)
FROM_CHECKOUT = PACKAGE_DIR == os.path.join(REPO, "embresume")
if TEST_INSTALLED and FROM_CHECKOUT:
    raise pytest.UsageError(f"EMBRESUME_TEST_INSTALLED=1 but embresume imports from this checkout "
                            f"({PACKAGE_DIR}): install the wheel non-editable (pip install dist/embresume-*.whl)")

from embresume.config import Config  # noqa: E402
from embresume.harness import free_port  # noqa: E402


def pytest_report_header(config):
    where = "this checkout" if FROM_CHECKOUT else "installed"
    return f"embresume {embresume.__version__} from {PACKAGE_DIR} ({where})"


def _named():
    """Shared-memory names of ours in /dev/shm.  embresume creates none (its
    segments are sealed memfds, its doorbells eventfds): any is a regression."""
    return set(glob.glob("/dev/shm/embr-*") + glob.glob("/dev/shm/sem.embr-*"))


def fd_links(prefix: str = "") -> set:
    """(fd, target) of this process's open fds whose link starts with ``prefix``
    (``/memfd:embresume``: our shared segments; ``socket:[``: sockets)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            out.add((int(fd), target))
    return out


def _fds():
    """This process's embresume memfds (what a leaked pool or ring would hold)."""
    return fd_links("/memfd:embresume")


@pytest.fixture(autouse=True)
def no_shm_leak():
    """Every test leaves nothing named in /dev/shm and no memfd of a pool or
    ring open in this process (memory that would never be freed)."""
    before, fds_before = _named(), _fds()
    yield
    deadline = time.monotonic() + 3
    while True:
        gc.collect()                 # views of a pool in reference cycles die here
        leaked, fds = _named() - before, _fds() - fds_before
        if (not leaked and not fds) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"shared-memory names left behind: {sorted(leaked)}"
    assert not fds, f"shared-memory fds left open: {sorted(fds)}"


def _mooncake_skip_reason():
    try:
        import embresume.transport.mooncake  # noqa: F401
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"Mooncake transport unavailable: {type(e).__name__}: {e}"
    return None


def gpu_skip_reason():
    """Why GPU tests cannot run here (None when they can)."""
    import torch
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and CuPy (torch sees no CUDA device)"
    try:
        import cupy  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"needs a CUDA GPU and CuPy (cupy does not import: {type(e).__name__}: {e})"
    return None


TRANSPORTS = [
    "shm",
    pytest.param("mooncake", marks=pytest.mark.mooncake),
    pytest.param("cuda_ipc", marks=pytest.mark.gpu),
]


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    reason = {"mooncake": _mooncake_skip_reason, "cuda_ipc": gpu_skip_reason}.get(request.param, lambda: None)()
    if reason:
        pytest.skip(reason)
    return request.param


def device_of(transport: str) -> str:
    return "cuda" if transport == "cuda_ipc" else "cpu"


def make_config(transport="shm", **kw) -> Config:
    base = dict(hidden_size=256, dtype="bf16", block_size=128, default_allocate_tokens=1024, pool_blocks=64,
                encoder_endpoint=f"tcp://127.0.0.1:{free_port()}", transport=transport, prefault=False,
                heartbeat_interval=0.2, peer_timeout=2.0, request_timeout=30.0, handshake_timeout=30.0)
    base["device"] = device_of(transport)
    base.update(kw)
    return Config(**base)


# ---------------------------------------------------------------- the real engine's models


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory):
    """The tiny Qwen2-VL (random weights, built offline by tests/engine/make_tiny_qwen2vl.py
    in the engine's interpreter), built once for every engine test module of the session."""
    sys.path.insert(0, os.path.join(REPO, "tests", "engine"))
    from harness import build_tiny_model, engine_python
    engine_py = engine_python()
    if engine_py is None:
        pytest.skip("no vLLM engine environment")
    return build_tiny_model(engine_py, tmp_path_factory.mktemp("models") / "tiny-qwen2-vl", "make_tiny_qwen2vl.py")


# ---------------------------------------------------------------- shared helpers


def wait_until(pred, timeout: float = 10.0) -> bool:
    """Poll ``pred`` every 20 ms for at most ``timeout`` seconds; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def layout_dict(cfg) -> dict:
    """The pool layout a rank with ``cfg`` announces in its handshake."""
    from embresume.blocks import BlockLayout
    return BlockLayout(cfg.total_pool_blocks, cfg.block_size, cfg.hidden_size, cfg.dtype, cfg.aux_ints).to_dict()


def child_env(**extra) -> dict:
    """The environment for a Python subprocess: it imports the embresume under test (this
    checkout first on the path when that is what is tested; the installed package otherwise)."""
    env = dict(os.environ)
    if FROM_CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def cli_env() -> dict:
    """The environment for a CLI subprocess: :func:`child_env`, 80 columns."""
    return child_env(COLUMNS="80")


def cmdline(pid: int) -> str:
    """A process's command line ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def record_phase_changes(machine) -> list:
    """Wrap a room machine's ``_set_phase`` (its one choke point) so that every
    change it makes is appended to the returned list as (record, old, new)."""
    changes: list = []
    set_phase = machine._set_phase

    def recorded(record, new):
        changes.append((record, record.phase, new))
        set_phase(record, new)
    machine._set_phase = recorded
    return changes


def check_phase_changes(changes: list, phase_type, transitions) -> None:
    """Every recorded change is to a ``phase_type`` and in ``transitions``; the list is emptied."""
    for record, old, new in changes:
        assert isinstance(new, phase_type) and new in transitions[old], (getattr(record, "room", record), old, new)
    changes.clear()


def state_machine_tests(*machines, examples: int, steps: int) -> list:
    """The unittest TestCase of each hypothesis RuleBasedStateMachine, with the
    settings the stateful tests share: ``examples`` runs of up to ``steps``
    steps, no deadline (the machine is loaded), no example database."""
    from hypothesis import HealthCheck, settings
    s = settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))
    out = []
    for m in machines:
        case = m.TestCase
        case.settings = s
        out.append(case)
    return out
