"""Re-judging a comparison at other SLOs, on hand-made records."""

import json

from bench import rejudge


def record(ttft, e2e, n, outcome="ok"):
    return {"outcome": outcome, "ttft_s": ttft, "e2e_s": e2e, "num_output_tokens": n, "itl_s": [0.1]}


def comparison():
    def target(label, by_rate):
        return {"label": label, "goodput": {"units": {"count": 2.0, "name": "core"}},
                "measurements": [{"summary": {"rate_rps": r}, "records": recs} for r, recs in by_rate]}
    # a: TTFT 0.2 s always; TPOT 0.02 at rate 1, 0.05 at rate 2.
    a = target("a", [(1.0, [record(0.2, 0.2 + 9 * 0.02, 10)] * 10),
                     (2.0, [record(0.2, 0.2 + 9 * 0.05, 10)] * 10)])
    # b: TTFT 0.2 s at rate 1, 2.0 s at rate 2; TPOT 0.01; one failed request at rate 1.
    b = target("b", [(1.0, [record(0.2, 0.29, 10)] * 9 + [record(None, None, 0, "http_error")]),
                     (2.0, [record(2.0, 2.09, 10)] * 10)])
    return {"slo": {"ttft_s": 1.0, "tpot_s": 0.03, "attainment": 0.9}, "targets": [a, b]}


def test_attainment_and_goodput_follow_the_slo():
    data = comparison()
    a, b = data["targets"]
    assert rejudge.attainment_by_rate(a, 1.0, 0.03) == [(1.0, 1.0), (2.0, 0.0)]
    assert rejudge.attainment_by_rate(a, 1.0, 0.06) == [(1.0, 1.0), (2.0, 1.0)]
    assert rejudge.attainment_by_rate(b, 1.0, 0.03) == [(1.0, 0.9), (2.0, 0.0)]
    assert rejudge.goodput(rejudge.attainment_by_rate(a, 1.0, 0.06), 0.9) == 2.0
    assert rejudge.goodput(rejudge.attainment_by_rate(b, 3.0, 0.03), 0.9) == 2.0
    # A failing lower rate caps goodput even if a higher rate passes.
    assert rejudge.goodput([(1.0, 0.5), (2.0, 1.0)], 0.9) == 0.0
    # A one-token answer meets any TPOT.
    assert rejudge.request_meets(record(0.1, 0.1, 1), 1.0, 0.0001)


def test_cli_prints_table_and_writes_compact(tmp_path, capsys):
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(comparison()))
    out = tmp_path / "compact.json"
    assert rejudge.main([str(path), "--tpot", "0.03", "0.06", "--compact", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1.000   0.060" in text and "2.00 req/s ( 1.00/unit)" in text
    assert "itl_s" not in out.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert rejudge.main([str(bad)]) == 2
    assert "not a comparison.json" in capsys.readouterr().err
