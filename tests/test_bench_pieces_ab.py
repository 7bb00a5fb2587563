"""bench/pieces_ab.py (pieces against one piece for a zero-copy receiver): a small run
gives every size both pairs' times and a memcpy, and leaves nothing behind."""

import json
import os

from embresume.bench import pieces_ab


def test_small_run_reports_both_pairs(tmp_path):
    before = set(os.listdir("/dev/shm"))
    out = tmp_path / "ab.json"
    assert pieces_ab.main(["--items", "3", "--hidden", "256", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["hidden"] == 256 and sorted(int(t) for t in res["sizes"]) == sorted(pieces_ab.SIZES)
    for row in res["sizes"].values():
        assert row["memcpy_ms"] > 0
        for name in ("pieces", "one piece"):
            assert 0 < row[name]["p50_ms"] <= row[name]["max_ms"]
    assert set(os.listdir("/dev/shm")) <= before
