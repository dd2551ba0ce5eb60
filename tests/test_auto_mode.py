"""Mode auto: `pdserve serve` serves the deployment the planner picks for the config's SLO
and workload on this CPU host (pdserve/auto_mode.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, ServeConfig, load_config
from pdserve.auto_mode import resolve_auto_mode
from pdserve.cli import main

# One engine on one core, in round numbers (ms): long steps, as the small model's. Timed as
# whole iterations (what `pdserve profile` writes), so no framework overhead is added.
PROFILE = {"test/model": {"1": {
    "prefill": [10.0, 0.1, 1e-5], "decoding_smallbs": [8.0, 0.001, 0.2],
    "decoding_largebs": [6.0, 0.001, 0.3], "decoding_large_small_bs_threshold": 95,
    "whole_iterations": True}}}
MODEL = {"model_type": "llama", "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4, "hidden_size": 1024, "intermediate_size": 2816,
         "vocab_size": 32000, "torch_dtype": "float16"}


@pytest.fixture
def planner_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "profile.json").write_text(json.dumps(PROFILE))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(MODEL))
    (tmp_path / "workload.yaml").write_text(yaml.safe_dump({"lengths": {
        "kind": "uniform", "input_len_min": 256, "input_len_max": 768,
        "output_len_min": 16, "output_len_max": 112}}))
    return {"profile": tmp_path / "profile.json", "model": tmp_path / "model",
            "workload": tmp_path / "workload.yaml"}


def _auto(files, ttft_s: float, tpot_s: float) -> ServeConfig:
    return load_config(overrides={
        "mode": "auto", "slo": {"ttft_s": ttft_s, "tpot_s": tpot_s},
        "router": {"port": 8123},
        "planner": {"workload": str(files["workload"]), "profile": str(files["profile"]),
                    "front_end_cpu_ms": 20, "shared_core_step_ms": 2, "kv_cache_gib": 2}})


def test_the_slo_decides_the_mode_and_the_cores_are_this_hosts(planner_files):
    host = [4, 7]  # the cores this process may use
    # A tight TPOT with room in TTFT: the decode instance alone on its core, the front end
    # with the prefill instance.
    tight = resolve_auto_mode(_auto(planner_files, 2.0, 0.011), planner_files["model"], host)
    assert tight.mode == "disaggregated"
    assert tight.prefill.cpu_cores == [[4]] and tight.decode.cpu_cores == [[7]]
    assert tight.ray.front_end_cores == [4]
    assert tight.prefill.kv_cache_gib == tight.decode.kv_cache_gib == 2
    # A tight TTFT: one engine alone on its core, the front end and the engine's scheduler
    # on the other, since an engine sharing its core with polling schedulers prefills slower.
    fast = resolve_auto_mode(_auto(planner_files, 0.3, 0.05), planner_files["model"], host)
    assert fast.mode == "colocated" and fast.colocated.cpu_cores == [[7]]
    assert fast.ray.front_end_cores == [4]
    # Room in both: two engines, one per core, the front end among them.
    loose = resolve_auto_mode(_auto(planner_files, 1.0, 0.1), planner_files["model"], host)
    assert loose.mode == "disaggregated" and loose.ray.front_end_cores is None
    assert loose.prefill.cpu_cores == [[4]] and loose.decode.cpu_cores == [[7]]
    # What the config said itself stays: the model as named, the SLO, the router.
    for resolved, ttft_s in ((tight, 2.0), (fast, 0.3), (loose, 1.0)):
        assert resolved.model.path is None and resolved.model.embedded == "tiny"
        assert (resolved.slo.ttft_s, resolved.router.port) == (ttft_s, 8123)
        assert resolved.planner == ServeConfig().planner  # served configs have no planner section


def test_a_workload_rate_is_checked_against_the_plan_not_used_to_shrink_it(
        tmp_path, planner_files, caplog):
    caplog.set_level("INFO", logger="pdserve.auto")
    for rate, verdict in ((0.5, "covers"), (1000.0, "falls short of")):
        workload = tmp_path / f"rate-{rate}.yaml"
        workload.write_text(yaml.safe_dump({**yaml.safe_load(planner_files["workload"].read_text()),
                                            "rate": rate}))
        config = _auto(planner_files, 1.0, 0.1).model_copy(update={
            "planner": _auto(planner_files, 1.0, 0.1).planner.model_copy(update={"workload": workload})})
        resolved = resolve_auto_mode(config, planner_files["model"], [0, 1])
        # The host's cores are planned either way: the same deployment as without a rate.
        assert resolved.mode == "disaggregated" and resolved.prefill.cpu_cores == [[0]]
        assert f"the workload's rate of {rate:g} req/s" in caplog.text and verdict in caplog.text


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_plain_pdserve_serve_plans_the_embedded_model_on_this_host(capsys, caplog):
    # No config, no mode: the planner picks, with the embedded tiny model's shipped profile.
    # The tiny model's steps are short, so the front end decides: one engine, the front
    # end on a core of its own (measured the best layout: docs/planner.md).
    caplog.set_level("INFO", logger="pdserve.auto")
    assert main(["serve", "--print-config", "--tpot-slo", "0.05"]) == 0
    config = ServeConfig.model_validate(yaml.safe_load(capsys.readouterr().out))
    cores = sorted(os.sched_getaffinity(0))
    assert config.mode == "colocated" and config.colocated.num_instances == 1
    assert config.ray.front_end_cores == [cores[0]] and config.colocated.cpu_cores == [[cores[1]]]
    assert "mode auto, chosen: front end on 1 core(s) of its own" in caplog.text
    # A pool flag, a config file or --mode choose the deployment themselves.
    assert main(["serve", "--print-config", "--num-prefill", "2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["mode"] == "disaggregated"


def test_mode_auto_refuses_what_it_would_ignore(tmp_path, planner_files, capsys):
    def error(argv: list[str]) -> str:  # a config error: the house format, no traceback
        assert main(["serve", "--print-config", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pdserve: ") and "Traceback" not in err
        return err

    assert "mode auto chooses the pools: colocated.num_instances" in error(
        ["--mode", "auto", "--num-instances", "2"])
    assert "planner.profile" in error(
        ["--mode", "auto", "--model", str(planner_files["model"])])
    assert "these settings are for mode auto" in error(
        ["--mode", "colocated", "--workload", str(planner_files["workload"])])
    assert "planner.workload: workload file not found" in error(
        ["--mode", "auto", "--workload", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="replan resizes a disaggregated deployment"):
        load_config(overrides={"mode": "auto", "replan": {"enabled": True, "plan_config": "p.yaml"}})
    with pytest.raises(ValueError, match="no pools until"):
        load_config(overrides={"mode": "auto"}).pools()


def test_serve_tools_are_told_to_deploy_the_written_plan():
    pytest.importorskip("ray")
    from pdserve.serve_app import parse_args

    with pytest.raises(ConfigError, match="--print-config > plan.yaml"):
        parse_args({"mode": "auto"})
