"""Per-request metrics, attainment and throughput on hand-made records."""

import pytest

from bench.metrics import distribution, request_metrics, summarize, tpot_s
from bench.records import RequestOutcome, RequestRecord, RunRecords
from cluster.config import SLOConfig

SLO = SLOConfig(ttft_s=0.5, tpot_s=0.1, attainment=0.75)


def record(index, ttft_s, e2e_s, num_output_tokens, outcome=RequestOutcome.OK, input_len=100):
    return RequestRecord(index=index, input_len=input_len, output_len=num_output_tokens,
                         scheduled_s=float(index), sent_s=float(index), outcome=outcome,
                         ttft_s=ttft_s, e2e_s=e2e_s, num_output_tokens=num_output_tokens,
                         num_prompt_tokens=input_len, num_chunks=num_output_tokens)


def test_tpot_is_mean_gap_after_first_token():
    assert tpot_s(e2e_s=2.0, ttft_s=0.2, num_output_tokens=10) == pytest.approx(0.2)
    assert tpot_s(e2e_s=0.3, ttft_s=0.3, num_output_tokens=1) is None


@pytest.mark.parametrize("ttft, e2e, n, meets_ttft, meets_tpot", [
    (0.5, 1.3, 10, True, True),      # TTFT at the bound meets it; TPOT 0.089
    (0.6, 1.5, 10, False, True),     # slow first token
    (0.4, 1.5, 10, True, False),     # TPOT 0.122
    (0.9, 0.9, 1, False, True),      # one token: no TPOT, TPOT SLO met
])
def test_request_slo(ttft, e2e, n, meets_ttft, meets_tpot):
    m = request_metrics(record(0, ttft, e2e, n), SLO)
    assert (m.meets_ttft, m.meets_tpot, m.meets_slo) == (meets_ttft, meets_tpot,
                                                         meets_ttft and meets_tpot)


def test_failed_request_misses_the_slo():
    m = request_metrics(record(0, 0.1, 0.2, 3, outcome=RequestOutcome.TIMEOUT), SLO)
    assert not m.is_ok and not m.meets_slo


def test_summary_attainment_throughput_percentiles():
    records = (
        record(0, 0.1, 0.9, 10),   # TPOT 0.089  meets both
        record(1, 0.2, 1.0, 10),   # TPOT 0.089  meets both
        record(2, 0.3, 2.1, 10),   # TPOT 0.2  misses TPOT
        record(3, 0.9, 1.8, 10),   # TTFT 0.9  misses TTFT
        record(4, 0.4, 0.4, 1),    # one token, meets both
        record(5, None, None, 0, outcome=RequestOutcome.HTTP_ERROR),
    )
    run = RunRecords(records=records, rate_rps=2.0, wall_time_s=10.0, num_not_sent=3)
    s = summarize(run, SLO)
    assert s.num_sent == 6 and s.num_ok == 5 and s.num_not_sent == 3
    assert s.attainment == pytest.approx(3 / 6)
    assert s.ttft_attainment == pytest.approx(4 / 6)
    assert s.tpot_attainment == pytest.approx(4 / 6)
    assert not s.meets_target  # 50% < 75%
    assert s.request_throughput_rps == pytest.approx(0.5)
    assert s.output_throughput_tps == pytest.approx(4.1)
    assert s.input_throughput_tps == pytest.approx(50.0)
    assert s.ttft_s.p50 == pytest.approx(0.3) and s.ttft_s.max == pytest.approx(0.9)
    assert s.tpot_s.count == 4
    assert s.tpot_s.mean == pytest.approx((0.8 / 9 * 2 + 0.2 + 0.1) / 4)
    assert s.outcome_counts == {"ok": 5, "http_error": 1}


def test_summary_meets_target_and_flags_length_mismatches():
    records = [record(i, 0.1, 0.1 + 0.05 * 9, 10) for i in range(9)]
    records.append(RequestRecord(index=9, input_len=100, output_len=10, scheduled_s=9.0,
                                 sent_s=9.2, outcome=RequestOutcome.OK, ttft_s=0.1, e2e_s=0.5,
                                 num_output_tokens=5, num_prompt_tokens=101))
    s = summarize(RunRecords(tuple(records), 1.0, 10.0), SLO)
    assert s.attainment == 1.0 and s.meets_target
    assert s.num_output_len_mismatches == 1 and s.num_prompt_len_mismatches == 1
    assert s.max_send_lag_s == pytest.approx(0.2)


def test_empty_run_does_not_meet_the_target():
    s = summarize(RunRecords((), 1.0, 0.0), SLO)
    assert s.attainment == 0.0 and not s.meets_target and s.ttft_s is None


def test_percentiles_interpolate():
    d = distribution(float(x) for x in range(1, 101))
    assert (d.p50, d.p90, d.p99, d.max) == pytest.approx((50.5, 90.1, 99.01, 100.0))
    assert distribution([]) is None


def test_record_json_round_trip():
    r = RequestRecord(index=1, input_len=5, output_len=3, scheduled_s=0.5, sent_s=0.51,
                      outcome=RequestOutcome.OK, ttft_s=0.1, e2e_s=0.3, num_output_tokens=3,
                      num_chunks=3, itl_s=(0.1, 0.1))
    assert RequestRecord.from_json(r.to_json()) == r
