"""The re-planning loop follows a workload shift on a running router (a short run of
`tests/planner/shift_deployment.py`; the full static-vs-resized comparison is run by hand)."""

from __future__ import annotations

import asyncio


def test_the_loop_follows_a_workload_shift(tmp_path):
    # Short run of tests/planner/shift_deployment.py (the full comparison is run by hand):
    # short prompts with long outputs, then long prompts with short outputs, at 14 req/s
    # on 4 modelled instances. The loop moves decode-heavy, then prefill-heavy.
    from tests.planner.shift_deployment import run_deployment

    results, decisions = asyncio.run(run_deployment(True, phase_s=12.0, workdir=tmp_path,
                                                    interval_s=4.0, window_s=5.0))
    resizes = [d for d in decisions if d.action == "resize"]
    assert resizes, [d.reason for d in decisions]
    # Some decision asked for more decodes than prefills, and a later one the reverse.
    decode_heavy = [i for i, d in enumerate(resizes) if d.num_decode[1] > d.num_prefill[1]]
    prefill_heavy = [i for i, d in enumerate(resizes) if d.num_prefill[1] > d.num_decode[1]]
    assert decode_heavy and prefill_heavy and min(decode_heavy) < max(prefill_heavy), \
        [d.reason for d in resizes]
    assert results[0].sizes == "1P+3D" or results[1].sizes == "3P+1D", results
