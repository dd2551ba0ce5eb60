"""The simulator against closed forms and queueing theory."""

import numpy as np
import pytest

from cluster.config import SLOConfig
from cluster.planner.colocated import ColocatedPool
from cluster.planner.decode_pool import DecodePool, TransferTopology
from cluster.planner.latency_model import EngineTiming, LatencyProfile
from cluster.planner.prefill_pool import PrefillPool
from cluster.planner.simulator import (DisaggregatedSystem, simulate_colocated, simulate_decode_only,
                                       simulate_disaggregated, simulate_prefill_only, violation_budget)
from cluster.planner.workload import ArrivalSpec, FixedLengths, make_trace

PROFILE = LatencyProfile(prefill=(10.0, 0.1, 1e-5), decoding_smallbs=(8.0, 0.001, 0.2),
                         decoding_largebs=(6.0, 0.001, 0.3))
KV_BYTES_PER_TOKEN = 800_000


def _arrays(*rows):
    arrival, ins, outs = zip(*rows)
    return np.array(arrival, float), np.array(ins), np.array(outs)


def _step_ms(batch, sum_ctx):
    a, b, c = PROFILE.decoding_smallbs
    return a + b * (sum_ctx + batch) + c * batch


def _one_link(bytes_per_s, latency_s=0.0, num_decode=1):
    return TransferTopology(
        decode_candidates=(tuple(range(num_decode)),), link_ids=((0,) * num_decode,),
        seconds_per_token=((KV_BYTES_PER_TOKEN / bytes_per_s,) * num_decode,), num_links=1,
        latency_s=latency_s)


def _system(topology=None, first_token_source="prefill", capacity=100_000, pp=1):
    return DisaggregatedSystem(PrefillPool(1, EngineTiming(PROFILE, pp)),
                               DecodePool(1, EngineTiming(PROFILE), capacity), topology,
                               first_token_source)


def test_one_request_ttft_is_prefill_plus_transfer():
    arrival, ins, outs = _arrays((1.0, 512, 10))
    prefill_s = PROFILE.prefill_ms([512]) / 1000
    transfer_s = 0.002 + 512 * KV_BYTES_PER_TOKEN / 10e9  # 10 GB/s link, 2 ms latency
    decode_s = sum(_step_ms(1, 512 + k) for k in range(9)) / 1000
    topology = _one_link(10e9, latency_s=0.002)

    # First token released once the KV has landed on decode: TTFT = prefill + transfer.
    r = simulate_disaggregated(_system(topology, "decode"), arrival, ins, outs)
    assert r.ttft_s[0] == pytest.approx(prefill_s + transfer_s, rel=1e-9)
    assert r.transfer_s[0] == pytest.approx(transfer_s)
    assert r.tpot_s[0] == pytest.approx(decode_s / 9, rel=1e-9)
    assert r.e2e_s[0] == pytest.approx(prefill_s + transfer_s + decode_s, rel=1e-9)

    # First token streamed by prefill: transfer delays the second token instead.
    r = simulate_disaggregated(_system(topology, "prefill"), arrival, ins, outs)
    assert r.ttft_s[0] == pytest.approx(prefill_s, rel=1e-9)
    assert r.tpot_s[0] == pytest.approx((transfer_s + decode_s) / 9, rel=1e-9)


def test_single_decode_stream_tpot_is_step_time():
    arrival, ins, outs = _arrays((0.0, 300, 101))
    r = simulate_decode_only(DecodePool(1, EngineTiming(PROFILE), 10_000), arrival, ins, outs)
    steps_ms = [_step_ms(1, 300 + k) for k in range(100)]  # context grows by one per token
    assert r.tpot_s[0] == pytest.approx(np.mean(steps_ms) / 1000, rel=1e-9)
    assert r.tpot_s[0] == pytest.approx(_step_ms(1, 349.5) / 1000, rel=1e-9)  # linear in context


def test_single_token_output_finishes_at_prefill():
    arrival, ins, outs = _arrays((0.0, 100, 1))
    r = simulate_disaggregated(_system(_one_link(1e9)), arrival, ins, outs)
    assert r.ttft_s[0] == r.e2e_s[0] == pytest.approx(PROFILE.prefill_ms([100]) / 1000)
    assert r.tpot_s[0] == 0.0


def test_prefill_queue_is_md1():
    """Batch size 1 and a fixed service time D make one prefill instance an M/D/1 queue:
    mean wait = rho / (2 mu (1 - rho))."""
    service_s = 0.010
    profile = LatencyProfile(prefill=(1000 * service_s, 0, 0), decoding_smallbs=(1, 0, 0),
                             decoding_largebs=(1, 0, 0))
    pool = PrefillPool(1, EngineTiming(profile), token_budget=1)  # every batch holds one request
    mu = 1 / service_s
    for rho in (0.5, 0.8):
        waits = []
        for seed in range(3):
            trace = make_trace(FixedLengths(input_len=1, output_len=1), ArrivalSpec(), 40_000, seed)
            r = simulate_prefill_only(pool, trace.arrivals_at(rho * mu), trace.input_lens, trace.output_lens)
            waits.append(np.mean(r.ttft_s - service_s))
        assert np.mean(waits) == pytest.approx(rho / (2 * mu * (1 - rho)), rel=0.08)


def test_pipeline_stages_overlap_batches():
    # Three equal prompts at t=0, one per batch, 2 stages of T/2: done at T, 1.5T, 2T.
    arrival, ins, outs = _arrays((0.0, 100, 1), (0.0, 100, 1), (0.0, 100, 1))
    pool = PrefillPool(1, EngineTiming(PROFILE, pipeline_parallel_size=2), token_budget=100)
    r = simulate_prefill_only(pool, arrival, ins, outs)
    t = PROFILE.prefill_ms([100]) / 1000
    assert r.ttft_s.tolist() == pytest.approx([t, 1.5 * t, 2 * t])


def test_prefill_batches_under_token_budget():
    # Two prompts of 300 at t=0 with budget 600 share one batch: both done at T([300, 300]).
    arrival, ins, outs = _arrays((0.0, 300, 1), (0.0, 300, 1), (0.0, 300, 1))
    r = simulate_prefill_only(PrefillPool(1, EngineTiming(PROFILE), token_budget=600), arrival, ins, outs)
    pair = PROFILE.prefill_ms([300, 300]) / 1000
    assert r.ttft_s.tolist() == pytest.approx([pair, pair, pair + PROFILE.prefill_ms([300]) / 1000])


def test_decode_memory_limit_serialises_requests():
    # Capacity for exactly one request's prompt + output: the second waits for the first.
    arrival, ins, outs = _arrays((0.0, 100, 11), (0.0, 100, 11))
    pool = DecodePool(1, EngineTiming(PROFILE), kv_capacity_tokens=111)
    r = simulate_decode_only(pool, arrival, ins, outs)
    alone_s = sum(_step_ms(1, 100 + k) for k in range(10)) / 1000
    assert r.e2e_s.tolist() == pytest.approx([alone_s, 2 * alone_s])
    # With room for both they batch together, each step costlier than alone but shorter in sum.
    r = simulate_decode_only(DecodePool(1, EngineTiming(PROFILE), 222), arrival, ins, outs)
    together_s = sum(_step_ms(2, 2 * (100 + k)) for k in range(10)) / 1000
    assert r.e2e_s.tolist() == pytest.approx([together_s, together_s])
    # A request larger than the whole cache fails instead of blocking the queue.
    r = simulate_decode_only(DecodePool(1, EngineTiming(PROFILE), 50), arrival, ins, outs)
    assert np.isinf(r.tpot_s).all()


def test_transfers_queue_on_a_shared_link():
    arrival, ins, outs = _arrays((0.0, 1000, 2), (0.0, 1000, 2))
    topology = _one_link(1e9, num_decode=2)  # 0.8 s per 1000-token transfer
    system = DisaggregatedSystem(PrefillPool(2, EngineTiming(PROFILE)),
                                 DecodePool(2, EngineTiming(PROFILE), 100_000),
                                 TransferTopology(((0, 1), (0, 1)), ((0, 0), (0, 0)),
                                                  ((8e-4, 8e-4), (8e-4, 8e-4)), 1),
                                 "decode")
    r = simulate_disaggregated(system, arrival, ins, outs)
    prefill_s = PROFILE.prefill_ms([1000]) / 1000
    assert sorted(r.ttft_s.tolist()) == pytest.approx([prefill_s + 0.8, prefill_s + 1.6])
    assert r.transfer_s.tolist() == pytest.approx([0.8, 0.8])
    assert topology.num_links == 1


def test_colocated_prefill_priority_stalls_decode():
    arrival, ins, outs = _arrays((0.0, 200, 21), (0.05, 2000, 2))
    prefill_priority = ColocatedPool(1, EngineTiming(PROFILE), 100_000, "prefill_priority")
    alone = simulate_colocated(prefill_priority, arrival[:1], ins[:1], outs[:1])
    assert alone.ttft_s[0] == pytest.approx(PROFILE.prefill_ms([200]) / 1000)
    assert alone.tpot_s[0] == pytest.approx(np.mean([_step_ms(1, 200 + k) for k in range(20)]) / 1000)
    # The 2000-token prompt arrives mid-decode and runs first: one token waits for all of it.
    both = simulate_colocated(prefill_priority, arrival, ins, outs)
    stall_s = PROFILE.prefill_ms([2000]) / 1000
    assert both.tpot_s[0] == pytest.approx(alone.tpot_s[0] + stall_s / 20, rel=0.02)


def test_colocated_chunked_prefill_closed_form():
    timing = EngineTiming(PROFILE)
    chunked = ColocatedPool(1, timing, 100_000, "chunked_prefill", token_budget=256)
    arrival, ins, outs = _arrays((0.0, 1000, 1))
    r = simulate_colocated(chunked, arrival, ins, outs)
    chunks = [(256, 0), (256, 256), (256, 512), (232, 768)]
    assert r.ttft_s[0] == pytest.approx(sum(timing.mixed_step_s([n], [p], 0, 0) for n, p in chunks))
    # A decode running alongside takes one token of each iteration's budget.
    arrival, ins, outs = _arrays((0.0, 10, 30), (0.001, 1000, 1))
    r = simulate_colocated(chunked, arrival, ins, outs)
    assert r.ttft_s[1] > sum(timing.mixed_step_s([n], [p], 0, 0) for n, p in chunks)
    assert np.isfinite(r.e2e_s).all()


def test_colocated_paged_memory_preempts_the_newest_request_and_recomputes_it():
    # vLLM's block manager on a colocated instance: two 100-token prompts, 11 output tokens
    # each, 215 tokens of KV. Paged, both are admitted (prompt KV only) and prefill as one
    # batch; after 8 decode steps the cache holds 216 tokens, the newer request is
    # preempted, waits for the older one, then recomputes prompt + its 9 tokens (109) in one
    # prefill that yields its 10th token, and decodes its last one.
    from cluster.planner.colocated import simulate_colocated_pool
    timing = EngineTiming(PROFILE)
    arrival, ins, outs = _arrays((0.0, 100, 11), (0.0, 100, 11))
    paged = ColocatedPool(1, timing, 215, "prefill_priority", memory="paged")
    out = simulate_colocated_pool(arrival, ins, outs, paged)
    prefill = timing.prefill_latency_s(200, 2 * 100 * 100)
    first_done = (prefill + sum(timing.decode_step_s(2, 2 * (100 + k)) for k in range(8))
                  + timing.decode_step_s(1, 108) + timing.decode_step_s(1, 109))
    second_done = first_done + timing.prefill_latency_s(109, 109 * 109) + timing.decode_step_s(1, 109)
    assert out.num_preemptions == 1
    assert out.first_token_s.tolist() == pytest.approx([prefill, prefill])
    assert out.finish_s.tolist() == pytest.approx([first_done, second_done])
    # Reserving prompt + output up front (2 x 111 > 215): the second waits from the start.
    reserve = simulate_colocated_pool(arrival, ins, outs, ColocatedPool(1, timing, 215, memory="reserve"))
    assert reserve.num_preemptions == 0
    assert reserve.first_token_s[1] == pytest.approx(reserve.finish_s[0] + timing.prefill_latency_s(100, 10_000))


def test_runs_are_deterministic_and_stop_early_when_lost():
    trace = make_trace(FixedLengths(input_len=500, output_len=50), ArrivalSpec(), 2000, seed=7)
    system = _system(_one_link(25e9))
    slo = SLOConfig(ttft_s=0.2, tpot_s=0.05, attainment=0.9)
    a = simulate_disaggregated(system, trace.arrivals_at(5), trace.input_lens, trace.output_lens, slo)
    b = simulate_disaggregated(system, trace.arrivals_at(5), trace.input_lens, trace.output_lens, slo)
    assert np.array_equal(a.ttft_s, b.ttft_s) and np.array_equal(a.tpot_s, b.tpot_s)
    assert a.attainment(slo) >= 0.9 and not a.stopped_early
    overloaded = simulate_disaggregated(system, trace.arrivals_at(50), trace.input_lens,
                                        trace.output_lens, slo, stop_when_lost=True)
    assert overloaded.stopped_early and overloaded.attainment(slo) < 0.9
    assert violation_budget(1000, 0.9) == 100 and violation_budget(7, 1.0) == 0


def test_paged_decode_preempts_the_newest_request_and_recomputes_it():
    # Two prompts of 100 tokens, 10 decode steps each, 215 tokens of KV: both fit at
    # admission (paged), the cache overflows after 8 steps (216 tokens), the newer request
    # is preempted, waits for the older one to finish, then recomputes its 108-token context.
    from cluster.planner.decode_pool import simulate_decode_pool
    arrival, ins, outs = _arrays((0.0, 100, 11), (0.0, 100, 11))
    pool = DecodePool(1, EngineTiming(PROFILE), kv_capacity_tokens=215, memory="paged")
    out = simulate_decode_pool(arrival, ins, outs, pool)
    together = sum(_step_ms(2, 2 * (100 + k)) for k in range(8))
    first_done = together + _step_ms(1, 108) + _step_ms(1, 109)
    second_done = first_done + PROFILE.prefill_ms([108]) + _step_ms(1, 108) + _step_ms(1, 109)
    assert out.num_preemptions == 1
    assert out.finish_s.tolist() == pytest.approx([first_done / 1000, second_done / 1000])
    # Reserving prompt + output up front never preempts: the second waits from the start.
    reserve = simulate_decode_pool(arrival, ins, outs, DecodePool(1, EngineTiming(PROFILE), 215,
                                                                   memory="reserve"))
    alone = sum(_step_ms(1, 100 + k) for k in range(10))
    assert reserve.num_preemptions == 0
    assert reserve.finish_s.tolist() == pytest.approx([alone / 1000, 2 * alone / 1000])


def test_decode_admission_limits():
    from cluster.planner.decode_pool import simulate_decode_pool
    arrival, ins, outs = _arrays((0.0, 100, 11), (0.0, 100, 11))
    alone = sum(_step_ms(1, 100 + k) for k in range(10)) / 1000
    # One token per step (max_num_batched_tokens) or one sequence: requests run one by one.
    for pool in (DecodePool(1, EngineTiming(PROFILE), 10_000, max_num_batched_tokens=1),
                 DecodePool(1, EngineTiming(PROFILE), 10_000, max_num_seqs=1)):
        out = simulate_decode_pool(arrival, ins, outs, pool)
        assert out.finish_s.tolist() == pytest.approx([alone, 2 * alone])
    # The watermark keeps 10% free: 2 x 100 tokens do not fit under 0.9 x 215 at admission.
    out = simulate_decode_pool(arrival, ins, outs,
                               DecodePool(1, EngineTiming(PROFILE), 215, admission_watermark=0.1))
    assert out.num_preemptions == 0 and out.finish_s.tolist() == pytest.approx([alone, 2 * alone])


def test_kv_load_on_the_step_path_stalls_every_running_request():
    from cluster.planner.decode_pool import simulate_decode_pool
    # The second request lands after the first one's first step; its 1000-token load
    # (1 ms per 100 tokens) stretches the step it joins for both.
    arrival, ins, outs = _arrays((0.0, 100, 3), (0.001, 1000, 2))
    pool = DecodePool(1, EngineTiming(PROFILE), 10_000, kv_load_s_per_token=1e-5)
    out = simulate_decode_pool(arrival, ins, outs, pool)
    step0 = _step_ms(1, 100) + 1000 * 1e-5 * 100
    step1 = _step_ms(2, 101 + 1000) + 1000 * 1e-5 * 1000
    assert out.finish_s.tolist() == pytest.approx([(step0 + step1) / 1000] * 2)


def test_kv_load_drains_the_pipeline_of_the_instance():
    from cluster.planner.decode_pool import simulate_decode_pool
    # PP2: A runs in lane 0; B lands 1 ms later in the idle lane 1. Its 1000-token load
    # (10 ms) holds the instance's step loop (DistServe's decode loop awaits each migration
    # between steps), and it waits first for A's micro-batch to leave the other stage (half
    # of A's step). Lane 0's next step waits for both.
    arrival, ins, outs = _arrays((0.0, 100, 3), (0.001, 1000, 2))
    timing = EngineTiming(PROFILE, 2)
    out = simulate_decode_pool(arrival, ins, outs, DecodePool(1, timing, 10_000, kv_load_s_per_token=1e-5))
    a_step0 = _step_ms(1, 100) + 1.0
    stall = 10.0 + _step_ms(1, 100) / 2
    b_step0 = _step_ms(1, 1000) + stall  # B's batch is the heavier: its own time
    # A's second step: the stages serve both micro-batches, so the lighter lane waits one
    # turn of both (their mean step), not its own.
    a_step1 = (_step_ms(1, 101) + _step_ms(1, 1000)) / 2 + stall
    assert out.finish_s.tolist() == pytest.approx([(a_step0 + a_step1) / 1000, 0.001 + b_step0 / 1000])
    # PP1 with the same requests: one lane, no pipeline to drain; B's load is charged once,
    # to the step it joins.
    pp1 = simulate_decode_pool(arrival, ins, outs,
                               DecodePool(1, EngineTiming(PROFILE), 10_000, kv_load_s_per_token=1e-5))
    assert pp1.finish_s[0] == pytest.approx((a_step0 + _step_ms(2, 101 + 1000) + 10.0) / 1000)
    # Without a load on the step path the lanes still share the stages: A's second step is
    # one turn of both, B's its own.
    free = simulate_decode_pool(arrival, ins, outs, DecodePool(1, timing, 10_000))
    assert free.finish_s.tolist() == pytest.approx(
        [(_step_ms(1, 100) + (_step_ms(1, 101) + _step_ms(1, 1000)) / 2) / 1000,
         0.001 + _step_ms(1, 1000) / 1000])


def test_pipeline_stages_pay_the_fixed_cost_each():
    split = EngineTiming(PROFILE, 2, stage_fixed_cost="split")
    per_stage = EngineTiming(PROFILE, 2, stage_fixed_cost="per_stage")
    a = PROFILE.decoding_smallbs[0]
    assert per_stage.decode_step_s(4, 400) - split.decode_step_s(4, 400) == pytest.approx(a / 1000)
    assert split.decode_step_s(4, 400) == pytest.approx(EngineTiming(PROFILE).decode_step_s(4, 400))
    first, later = per_stage.prefill_stage_s(300, 300**2)
    assert later == pytest.approx((PROFILE.prefill[0] + (PROFILE.prefill_ms([300]) - PROFILE.prefill[0]) / 2) / 1000)


def test_colocated_pipeline_lanes_run_side_by_side():
    # Two prompts at once: on one PP2 instance they take a lane each (parallel, each at the
    # lane's unpipelined time); on a PP1 instance with the same timing they share a batch.
    arrival, ins, outs = _arrays((0.0, 400, 1), (0.0, 400, 1))
    lane = EngineTiming(PROFILE)
    pp2 = simulate_colocated(ColocatedPool(1, lane, 100_000, pipeline_parallel_size=2), arrival, ins, outs)
    pp1 = simulate_colocated(ColocatedPool(1, lane, 100_000), arrival, ins, outs)
    assert pp2.ttft_s.tolist() == pytest.approx([PROFILE.prefill_ms([400]) / 1000] * 2)
    assert pp1.ttft_s.tolist() == pytest.approx([PROFILE.prefill_ms([400, 400]) / 1000] * 2)
    # The lanes share the stages: next to a 1000-token prompt, a 100-token one waits one turn
    # of both (the mean of their prefills), not only its own prefill.
    arrival, ins, outs = _arrays((0.0, 1000, 1), (0.0, 100, 1))
    mixed = simulate_colocated(ColocatedPool(1, lane, 100_000, pipeline_parallel_size=2), arrival, ins, outs)
    heavy, light = PROFILE.prefill_ms([1000]) / 1000, PROFILE.prefill_ms([100]) / 1000
    assert mixed.ttft_s.tolist() == pytest.approx([heavy, (heavy + light) / 2])
    # Each lane holds half the KV: a request needing more than half fails on PP2 only.
    arrival, ins, outs = _arrays((0.0, 600, 2))
    assert np.isinf(simulate_colocated(ColocatedPool(1, lane, 1000, pipeline_parallel_size=2),
                                       arrival, ins, outs).tpot_s).all()
    assert np.isfinite(simulate_colocated(ColocatedPool(1, lane, 1000), arrival, ins, outs).tpot_s).all()
