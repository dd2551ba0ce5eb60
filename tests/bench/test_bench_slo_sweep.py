"""SLO sweep of a comparison with several targets, re-judged from per-request records."""

import json

from bench.slo_sweep import main, met_per_s


def _measurement(rate, ttfts, tpot, wall_s=10.0):
    n = 5  # output tokens: TPOT = (e2e - ttft) / 4
    records = [{"outcome": "ok", "ttft_s": t, "e2e_s": t + tpot * (n - 1),
                "num_output_tokens": n} for t in ttfts]
    return {"summary": {"rate_rps": rate, "wall_time_s": wall_s}, "records": records}


def _comparison(tmp_path):
    data = {"slo": {"ttft_s": 1.0, "tpot_s": 0.05, "attainment": 0.9}, "targets": [
        {"label": "peer", "measurements": [_measurement(1, [0.1] * 10, 0.02),
                                           _measurement(8, [0.1] * 9 + [2.0], 0.04)]},
        {"label": "fast", "measurements": [_measurement(1, [0.1] * 10, 0.01),
                                           _measurement(8, [0.1] * 10, 0.01)]},
        {"label": "slow", "measurements": [_measurement(1, [0.6] * 10, 0.03),
                                           _measurement(8, [3.0] * 10, 0.03)]},
    ]}
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(data))
    return path, data


def test_sweep_rejudges_every_target_against_the_first(tmp_path, capsys):
    path, data = _comparison(tmp_path)
    assert main([str(path), "--ttft", "0.5", "1", "--tpot", "0.03", "0.05"]) == 0
    out = capsys.readouterr().out
    first_table = out.split("\n\n")[0]  # goodput per SLO pair; per-rate tables follow
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in first_table.splitlines()
            if line[:1].isdigit() and len(line.split()) == 7}
    # TTFT 1 s, TPOT 50 ms: peer 9/10 at 8 req/s (meets 90%), fast both, slow only at 1.
    assert rows[("1", "0.05")][:3] == ["8", "8", "1"]
    assert rows[("1", "0.05")][3:] == ["1.00x", "0.12x"]
    # TTFT 0.5 s: slow meets nothing; TPOT 30 ms: peer's 40 ms at 8 req/s fails.
    assert rows[("0.5", "0.03")][:3] == ["1", "8", "0"]
    assert met_per_s(data["targets"][0]["measurements"][1], 1.0, 0.05) == 0.9
    assert "at 8 req/s: requests meeting both SLOs per second" in out


def test_not_a_comparison_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main([str(bad), "--ttft", "1", "--tpot", "0.1"]) == 2
    assert capsys.readouterr().err.startswith("pdserve bench: error:")
