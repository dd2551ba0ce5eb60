"""The config tree and the `pdserve serve` command line: validation errors name the field."""

import pytest
import yaml

from pdserve.cli import main
from cluster.config import ConfigError, ServeConfig, dump_config, load_config
from pdserve.launcher import (with_default_cpu_cores, with_default_engine_in_router,
                              with_default_front_end_cores)


def test_defaults_are_one_prefill_one_decode():
    cfg = load_config()
    assert cfg.mode == "disaggregated"
    assert set(cfg.pools()) == {"prefill", "decode"}
    assert cfg.prefill.num_instances == cfg.decode.num_instances == 1


def test_yaml_and_overrides_merge_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"mode": "colocated", "colocated": {"num_instances": 3},
                                    "router": {"port": 9001}}))
    cfg = load_config(path, {"router": {"host": "0.0.0.0"}})
    assert (cfg.colocated.num_instances, cfg.router.port, cfg.router.host) == (3, 9001, "0.0.0.0")
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("data, field", [
    ({"prefill": {"num_instances": -1}}, "prefill.num_instances"),
    ({"prefill": {"num_instance": 2}}, "prefill.num_instance"),
    ({"kv_transfer": {"transport": "carrier-pigeon"}}, "kv_transfer.transport"),
    ({"slo": {"attainment": 1.5}}, "slo.attainment"),
    ({"router": {"port": 70000}}, "router.port"),
    ({"decode": {"num_instances": 2, "cpu_cores": [[0]]}}, "decode"),
    ({"mode": "disaggregated", "decode": {"num_instances": 0}}, "disaggregated mode needs"),
])
def test_invalid_config_names_the_field(tmp_path, data, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field in str(err.value)


def test_cli_errors_are_one_clean_line(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"pdserve: config file not found: {tmp_path / 'missing.yaml'}"
    (tmp_path / "notyaml.yaml").write_text("a: [1, 2\n")
    assert main(["serve", "--config", str(tmp_path / "notyaml.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not a Hugging Face model directory" in err and "Traceback" not in err


def test_print_config_applies_flags(capsys):
    assert main(["serve", "--print-config", "--mode", "colocated", "--num-instances", "2",
                 "--port", "8123", "--tpot-slo", "0.05"]) == 0
    cfg = ServeConfig.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert (cfg.mode, cfg.colocated.num_instances, cfg.router.port, cfg.slo.tpot_s) == (
        "colocated", 2, 8123, 0.05)


def test_default_cpu_cores_give_each_instance_its_own():
    cfg = load_config()
    pinned = with_default_cpu_cores(cfg, [0, 1])
    assert pinned.prefill.cpu_cores == [[0]] and pinned.decode.cpu_cores == [[1]]
    colo = with_default_cpu_cores(load_config(overrides={"mode": "colocated",
                                                         "colocated": {"num_instances": 1}}), [0, 1])
    # Fewer instances than cores: the first core is the front end's, the engine gets the rest.
    assert colo.colocated.cpu_cores == [[1]]
    roomy = with_default_cpu_cores(cfg, [0, 1, 2, 3, 4])
    assert roomy.prefill.cpu_cores == [[1, 2]] and roomy.decode.cpu_cores == [[3, 4]]
    crowded = with_default_cpu_cores(load_config(overrides={"prefill": {"num_instances": 2},
                                                            "decode": {"num_instances": 1}}), [0, 1])
    assert crowded.prefill.cpu_cores == [[0], [1]] and crowded.decode.cpu_cores == [[0]]


def test_the_front_end_is_pinned_to_the_cores_the_engines_leave_free():
    one = load_config(overrides={"mode": "colocated", "colocated": {"num_instances": 1}})
    placed = with_default_front_end_cores(with_default_cpu_cores(one, [0, 1]), [0, 1])
    assert placed.colocated.cpu_cores == [[1]] and placed.ray.front_end_cores == [0]
    roomy = with_default_front_end_cores(with_default_cpu_cores(load_config(), [0, 1, 2, 3, 4]),
                                         [0, 1, 2, 3, 4])
    assert roomy.ray.front_end_cores == [0]  # prefill [1, 2], decode [3, 4]
    # Engines on every core: the front end shares them, nothing is pinned.
    full = with_default_front_end_cores(with_default_cpu_cores(load_config(), [0, 1]), [0, 1])
    assert full.ray.front_end_cores is None
    # The user's choice stands, and engines that may run anywhere leave nothing to pin.
    chosen = load_config(overrides={"mode": "colocated", "colocated": {"num_instances": 1},
                                    "ray": {"front_end_cores": [1]}})
    chosen = with_default_front_end_cores(with_default_cpu_cores(chosen, [0, 1]), [0, 1])
    assert chosen.ray.front_end_cores == [1]
    assert with_default_front_end_cores(one, [0, 1]).ray.front_end_cores is None
    remote = load_config(overrides={"mode": "colocated", "colocated": {"num_instances": 1,
                                    "cpu_cores": [[1]]}, "ray": {"address": "auto"}})
    assert with_default_front_end_cores(remote, [0, 1]).ray.front_end_cores is None


def test_api_key_flag_reaches_the_router_config_and_is_never_printed(capsys):
    key = "flag-key-0123456789abcdef"
    assert main(["serve", "--api-key", key, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert key not in out
    assert yaml.safe_load(out)["router"]["api_key"] == "**********"


def test_the_stream_relay_is_refused_where_it_cannot_run(tmp_path, capsys):
    config = tmp_path / "relay.yaml"
    config.write_text("ray:\n  stream_relay: true\n")
    assert main(["serve", "--runtime", "actors", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "stream_relay" in err and "--runtime serve" in err and "\n" not in err


def test_one_colocated_instance_runs_in_the_router_unless_the_config_says_otherwise():
    one = load_config(overrides={"mode": "colocated", "colocated": {"num_instances": 1}})
    assert one.ray.engine_in_router is None  # unset: pdserve serve chooses
    assert with_default_engine_in_router(one).ray.engine_in_router is True
    for other in ({"mode": "colocated", "colocated": {"num_instances": 2}},
                  {"mode": "colocated", "colocated": {"num_instances": 1}, "ray": {"router_replicas": 2}},
                  {}):  # disaggregated
        assert with_default_engine_in_router(load_config(overrides=other)).ray.engine_in_router is False
    kept = load_config(overrides={"mode": "colocated", "colocated": {"num_instances": 1},
                                  "ray": {"engine_in_router": False}})
    assert with_default_engine_in_router(kept).ray.engine_in_router is False
