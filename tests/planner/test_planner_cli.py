"""`pdserve plan` end to end: flags/YAML in, a loadable serve config out, exit codes."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from cluster.planner import cli

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ["--num-requests", "300", "--num-seeds", "1"]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def _synthetic_args(profile: Path, model: Path) -> list[str]:
    return ["--model", str(model), "--profile", str(profile), "--input-len-range", "256", "768",
            "--output-len-range", "16", "112", "--ttft-s", "0.2", "--tpot-s", "0.04",
            "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gib", "16", *FAST]


def test_reference_opt13b_plan_loads_as_serve_config(shared_data, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    code = _run(["--model", "facebook/opt-13b",
                 "--profile", str(shared_data / "profiler-a100-80g.distserve.json"),
                 "--workload-csv", str(shared_data / "sharegpt_opt_lengths.csv"),
                 "--ttft-s", "0.25", "--tpot-s", "0.1", "--attainment", "0.9",
                 "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gib", "80",
                 "--output", str(out), *FAST])
    report = capsys.readouterr().out
    assert code == 0, report
    config = load_config(out)
    assert config.mode == "disaggregated"
    assert (config.slo.ttft_s, config.slo.tpot_s, config.slo.attainment) == (0.25, 0.1, 0.9)
    gpus = 0.0
    for pool in (config.prefill, config.decode):
        assert pool.num_instances >= 1
        assert pool.num_gpus == pool.tensor_parallel_size * pool.pipeline_parallel_size
        gpus += pool.num_instances * pool.num_gpus
    assert gpus <= 4
    assert "Chosen plan" in report and "Runner-up plans" in report and "req/s per GPU" in report


def test_yaml_inputs_with_flag_override_and_base_config(synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    request = {
        "model": str(tiny_model_dir), "profile": str(synthetic_profile_path),
        "slo": {"ttft_s": 0.2, "tpot_s": 0.04, "attainment": 0.9},
        "workload": {"lengths": {"kind": "lognormal", "input_len_median": 400, "input_len_sigma": 0.4,
                                 "output_len_median": 50, "output_len_sigma": 0.5},
                     "arrival": {"process": "gamma", "cv": 2.0}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "gpu_memory_gib": 16},
        "search": {"num_requests": 300, "num_seeds": 1},
    }
    (tmp_path / "plan-in.yaml").write_text(yaml.safe_dump(request))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"router": {"port": 9123}}))
    out = tmp_path / "out" / "plan.yaml"
    code = _run(["--config", str(tmp_path / "plan-in.yaml"), "--max-gpus", "3",
                 "--base-config", str(tmp_path / "base.yaml"), "--output", str(out)])
    assert code == 0, capsys.readouterr().out
    config = load_config(out)
    assert config.router.port == 9123  # kept from the base config
    assert config.model.path == tiny_model_dir.resolve()
    used = sum(p.num_instances * p.num_gpus for p in (config.prefill, config.decode))
    assert used <= 3  # the flag overrode the YAML's 8-GPU node
    assert "gamma (cv 2)" in capsys.readouterr().out


def test_unreachable_rate_exits_1_without_writing(synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    code = _run(_synthetic_args(synthetic_profile_path, tiny_model_dir) + ["--rate", "5000", "-o", str(out)])
    assert code == 1
    assert "NO PLAN" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": None}, "model: required"),
        ({"--model": "facebook/opt-1b"}, "reference model"),
        ({"--profile": "/nonexistent/profile.json"}, "profile file not found"),
        ({"--ttft-s": "-1"}, "slo.ttft_s"),
        ({"--attainment": "1.5"}, "slo.attainment"),
        ({"--nodes": "0"}, "cluster.num_nodes"),
        ({"--workload-csv": "x.csv"}, "choose one way"),
        ({"--input-len-range": None}, "go together"),
        ({"--max-gpus": "99"}, "exceeds"),
        ({"--profile-model": "other"}, "no model 'other'"),
    ],
)
def test_bad_input_exits_2_with_one_line(synthetic_profile_path, tiny_model_dir, capsys, change, message):
    argv = _synthetic_args(synthetic_profile_path, tiny_model_dir)
    for flag, value in change.items():
        if flag in argv:
            i = argv.index(flag)
            nargs = 2 if flag.endswith("-range") else 1
            del argv[i:i + 1 + nargs]
        if value is not None:
            argv += [flag, value]
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdserve plan: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_bad_yaml_and_base_config_exit_2(synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert _run(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "mapping" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"modle": "x"}))
    assert _run(["--config", str(tmp_path / "typo.yaml")]) == 2
    assert "modle" in capsys.readouterr().err
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"router": {"port": -5}}))
    argv = _synthetic_args(synthetic_profile_path, tiny_model_dir) + ["--base-config", str(tmp_path / "base.yaml")]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "router.port" in err and err.count("\n") == 1


def test_module_entry_point(synthetic_profile_path, tiny_model_dir):
    ok = subprocess.run([sys.executable, "-m", "cluster.planner.cli", *_synthetic_args(synthetic_profile_path, tiny_model_dir)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "mode: disaggregated" in ok.stdout  # no --output: the YAML is printed
    bad = subprocess.run([sys.executable, "-m", "cluster.planner.cli", "--model", "nope"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_slo_that_never_binds_is_an_error_not_a_goodput(synthetic_profile_path, tiny_model_dir, capsys):
    args = _synthetic_args(synthetic_profile_path, tiny_model_dir)
    args[args.index("--ttft-s") + 1] = "1e9"
    args[args.index("--tpot-s") + 1] = "1e9"
    assert _run(args) == 2
    captured = capsys.readouterr()
    assert "does not bind" in captured.err and "req/s" not in captured.out


def test_over_budget_configurations_are_listed_as_excluded(synthetic_profile_path, tiny_model_dir, capsys):
    code = _run(_synthetic_args(synthetic_profile_path, tiny_model_dir) + ["--max-gpus", "1",
                                                                          "--max-pipeline-parallel", "1"])
    report = capsys.readouterr().out
    assert code == 1  # one GPU cannot hold a prefill and a decode instance
    assert "TP2: needs 2 GPUs, over the budget of 1" in report


def test_unprofiled_model_says_to_profile_it(shared_data, capsys):
    code = _run(["--model", "facebook/opt-175b",
                 "--profile", str(shared_data / "profiler-a100-80g.distserve.json"),
                 "--input-len", "512", "--output-len", "64", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "no entry for facebook/opt-175b" in err and "pdserve profile" in err


def test_transfer_links_are_named_by_where_instances_sit(synthetic_profile_path, tiny_model_dir):
    from cluster.planner.inputs import PlanRequest
    from cluster.planner.plans import ParallelConfig, Plan
    from cluster.planner.problem import build_problem
    from cluster.planner.report import _links
    problem = build_problem(PlanRequest.model_validate({
        "model": str(tiny_model_dir), "profile": str(synthetic_profile_path),
        "workload": {"lengths": {"kind": "fixed", "input_len": 100, "output_len": 10}},
        "cluster": {"num_nodes": 2, "gpus_per_node": 2, "gpu_memory_gib": 16}}))
    tp1, tp2 = ParallelConfig(1, 1), ParallelConfig(2, 1)
    assert _links(Plan("high_node_affinity", tp1, 1, tp1, 1), problem) == "NVLink, same node"
    assert _links(Plan("high_node_affinity", tp2, 1, tp2, 1), problem) == "inter-node link"
    assert _links(Plan("high_node_affinity", tp2, 1, tp1, 2), problem) == "inter-node link"
    assert _links(Plan("high_node_affinity", tp1, 1, tp1, 3), problem).startswith("NVLink or inter-node")


def test_serve_colocated_when_it_wins(synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    # Two cores, prompts of 256-768 tokens and 2-4 output tokens: a decode-only core would
    # idle, two colocated cores both prefill. The verdict and the written config say so.
    out = tmp_path / "plan.yaml"
    code = _run(["--model", str(tiny_model_dir), "--profile", str(synthetic_profile_path),
                 "--input-len-range", "256", "768", "--output-len-range", "2", "4",
                 "--ttft-s", "0.5", "--tpot-s", "0.2", "--device", "cpu", "--nodes", "1",
                 "--gpus-per-node", "2", "--gpu-memory-gib", "4", "--compare-colocated",
                 "--output", str(out), *FAST])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "VERDICT: serve colocated" in report
    config = load_config(out)
    assert config.mode == "colocated" and config.colocated.num_instances == 2


def test_colocated_baseline_includes_pipeline_parallel(synthetic_profile_path, tiny_model_dir):
    from cluster.planner.inputs import PlanRequest
    from cluster.planner.problem import build_problem
    from cluster.planner.search import search
    outcome = search(build_problem(PlanRequest.model_validate({
        "model": str(tiny_model_dir), "profile": str(synthetic_profile_path),
        "slo": {"ttft_s": 0.3, "tpot_s": 0.05},
        "workload": {"lengths": {"kind": "uniform", "input_len_min": 256, "input_len_max": 768,
                                 "output_len_min": 16, "output_len_max": 112}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 4, "gpu_memory_gib": 16},
        "search": {"num_requests": 200, "num_seeds": 1, "max_pipeline_parallel": 2,
                   "compare_colocated": True, "placements": ["high_node_affinity"]}})))
    shapes = {(g.tp, g.pp) for g in outcome.colocated}
    assert {(1, 1), (1, 2), (2, 1), (2, 2)} <= shapes
    assert all(g.num_instances * g.tp * g.pp == 4 for g in outcome.colocated)
    assert all(g.deployment_goodput_rps >= g.goodput_rps for g in outcome.colocated)
