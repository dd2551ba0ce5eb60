"""The re-planning loop follows a workload shift on a running router (a short run of
`tests/planner/shift_deployment.py`; the full static-vs-resized comparison is run by hand)."""

from __future__ import annotations

import asyncio


def test_the_loop_follows_a_workload_shift(tmp_path):
    # Short run of tests/planner/shift_deployment.py (the full comparison is run by hand):
    # short prompts with long outputs, then long prompts with short outputs, at 14 req/s
    # on 4 modelled instances. The loop moves decode-heavy, then prefill-heavy.
    from tests.planner.shift_deployment import run_deployment

    timeline: list[tuple[float, int, int]] = []
    results, decisions = asyncio.run(run_deployment(True, phase_s=12.0, workdir=tmp_path,
                                                    interval_s=4.0, window_s=5.0,
                                                    timeline=timeline))
    resizes = [d for d in decisions if d.action == "resize"]
    assert resizes, [d.reason for d in decisions]
    # Some decision asked for more decodes than prefills, and a later one the reverse.
    decode_heavy = [i for i, d in enumerate(resizes) if d.num_decode[1] > d.num_prefill[1]]
    prefill_heavy = [i for i, d in enumerate(resizes) if d.num_prefill[1] > d.num_decode[1]]
    assert decode_heavy and prefill_heavy and min(decode_heavy) < max(prefill_heavy), \
        [d.reason for d in resizes]
    # Every resize was carried out on the running pool: between its decision and the next
    # one, the router served exactly the sizes it asked for. (When in the phase a decision
    # falls depends on how fast the machine runs the ticks, so the sizes at a phase's end
    # are printed by the hand-run comparison, not asserted here.)
    for i, d in enumerate(resizes):
        until = resizes[i + 1].time_s if i + 1 < len(resizes) else float("inf")
        seen = {(p, n) for t, p, n in timeline if d.time_s <= t < until}
        assert (d.num_prefill[1], d.num_decode[1]) in seen, (d, sorted(seen))
    # The pool served decode-heavy first, prefill-heavy later, and reached the sizes the
    # workload needs (1 + 3 for the first phase or 3 + 1 for the second) at least once.
    first_decode_heavy = min(t for t, p, n in timeline if n > p)
    assert any(p > n and t > first_decode_heavy for t, p, n in timeline), results
    assert any((p, n) in ((1, 3), (3, 1)) for _, p, n in timeline), results
