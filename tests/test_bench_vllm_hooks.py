"""bench/vllm_hooks.py (the vLLM connector's hook time per scheduler step): the --quick
profile runs once against vLLM's real classes and its JSON has every (R, T) cell with
positive numbers.  No timing assertions: the machine decides those."""

from __future__ import annotations

import json
import math

import pytest

try:
    from vllm.config import DeviceConfig, ECTransferConfig, ParallelConfig, VllmConfig  # noqa: F401
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorRole  # noqa: F401
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory  # noqa: F401
    from vllm.v1.core.sched.output import SchedulerOutput  # noqa: F401
    from vllm.v1.outputs import ECConnectorOutput  # noqa: F401
    from vllm.v1.request import Request  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"vLLM's EC connector interface does not import here ({type(e).__name__}: {e}); "
                "install it with the lines in docs/integrations.md", allow_module_level=True)

from embresume.bench import vllm_hooks

pytestmark = pytest.mark.timeout(300)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_profile_writes_every_cell(tmp_path, capsys):
    out = tmp_path / "hooks.json"
    assert vllm_hooks.main(["--quick", "-q", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    prof = vllm_hooks.PROFILES["quick"]
    cells = {(c["requests"], c["open"]): c for c in r["cells"]}
    assert set(cells) == {(R, T) for R in prof["requests"] for T in prof["open"]}
    for (R, T), c in cells.items():
        for name in ("embresume", "example", "null"):
            s = c[name]
            assert s["n"] >= 1, (R, T, name)
            assert all(_positive(s[k]) for k in ("p50_us", "p99_us", "mean_us")), (R, T, name, s)
        assert c["calls_per_step"]["ensure_cache_available"] == R + T + 1
        assert _positive(c["x_null_p50"])
        assert c["embresume"]["admit_hit_rate"] == 1.0     # every admitted item was landed and reported present
        if "open_transfers_seen" in c:
            assert c["open_transfers_seen"] == T        # they stayed open for the whole cell
    assert [l["mb"] for l in r["landing"]] == [mb for mb, _ in vllm_hooks.LAND_SIZES]
    for l in r["landing"]:
        assert _positive(l["memcpy"]["p50_us"]) and _positive(l["landing_hook_call"]["p50_us"])
        assert l["land"] is None or _positive(l["land"]["p50_us"])
        assert _positive(l["request_to_available"]["p50_us"])
    assert "hook time per scheduler step" in capsys.readouterr().out
