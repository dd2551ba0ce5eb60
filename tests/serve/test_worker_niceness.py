"""pdserve serve runs Ray's workers (and so the engines) at nice 0 only where the engines
leave the front end a core of its own (pdserve/serving.py worker_niceness_env)."""

from __future__ import annotations

import pytest

from cluster.config import ServeConfig
from pdserve.launcher import with_default_cpu_cores
from pdserve.serving import worker_niceness_env


@pytest.fixture(autouse=True)
def _no_user_setting(monkeypatch):
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setattr("pdserve.serving.is_cuda_available", lambda: False)


def _placed(raw: dict, cores: list[int]) -> ServeConfig:
    return with_default_cpu_cores(ServeConfig.model_validate(raw), cores)


def test_one_instance_on_two_cores_runs_at_nice_0():
    config = _placed({"mode": "colocated", "colocated": {"num_instances": 1}}, [0, 1])
    assert config.colocated.cpu_cores == [[1]]  # core 0 is the front end's
    assert worker_niceness_env(config, [0, 1]) == {"RAY_worker_niceness": "0"}


def test_engines_on_every_core_keep_rays_nice_15():
    for raw in ({"mode": "colocated", "colocated": {"num_instances": 2}},
                {"mode": "disaggregated"}):
        assert worker_niceness_env(_placed(raw, [0, 1]), [0, 1]) == {}


def test_pinned_engines_leaving_a_core_free_run_at_nice_0_but_not_on_every_core():
    free = ServeConfig.model_validate({"mode": "colocated",
                                       "colocated": {"num_instances": 1, "cpu_cores": [[0]]}})
    assert worker_niceness_env(free, [0, 1]) == {"RAY_worker_niceness": "0"}
    full = ServeConfig.model_validate({"mode": "colocated",
                                       "colocated": {"num_instances": 1, "cpu_cores": [[0, 1]]}})
    assert worker_niceness_env(full, [0, 1]) == {}


def test_a_users_setting_and_gpus_are_left_alone(monkeypatch):
    config = _placed({"mode": "colocated", "colocated": {"num_instances": 1}}, [0, 1])
    monkeypatch.setenv("RAY_worker_niceness", "15")
    assert worker_niceness_env(config, [0, 1]) == {}
    monkeypatch.delenv("RAY_worker_niceness")
    monkeypatch.setattr("pdserve.serving.is_cuda_available", lambda: True)
    assert worker_niceness_env(config, [0, 1]) == {}


def test_engines_reniced_below_the_front_end_let_it_run_at_nice_0():
    # Engines on every core, but each pool renices its engines (cpu_nice > 0): the front end
    # (Ray's workers: router and replicas) runs at 0 above them. One pool left at Ray's
    # niceness, or a pool raised above the front end, keeps Ray's 15.
    both = {"mode": "disaggregated", "prefill": {"cpu_nice": 19}, "decode": {"cpu_nice": 10}}
    assert worker_niceness_env(_placed(both, [0, 1]), [0, 1]) == {"RAY_worker_niceness": "0"}
    colocated = {"mode": "colocated", "colocated": {"num_instances": 2, "cpu_nice": 19}}
    assert worker_niceness_env(_placed(colocated, [0, 1]), [0, 1]) == {"RAY_worker_niceness": "0"}
    one = {"mode": "disaggregated", "prefill": {"cpu_nice": 19}}
    assert worker_niceness_env(_placed(one, [0, 1]), [0, 1]) == {}
    raised = {"mode": "colocated", "colocated": {"num_instances": 2, "cpu_nice": 0}}
    assert worker_niceness_env(_placed(raised, [0, 1]), [0, 1]) == {}


def test_the_control_plane_is_reniced_and_the_data_path_is_not(monkeypatch):
    """`renice_control_plane` picks Ray's daemons, Serve's controller and proxy and the
    registry replica from the processes under `pdserve serve`, never a router or engine
    replica, an engine process or an idle worker (Ray may give one to a new replica)."""
    from pdserve import serving

    titles = {
        11: "/venv/ray/core/src/ray/gcs/gcs_server --gcs_server_port=0",
        12: "/venv/ray/core/src/ray/raylet/raylet --raylet_socket_name=x",
        13: "ray::DashboardAgent", 14: "ray::RuntimeEnvAgent",
        15: "ray::ServeController.listen_for_change", 16: "ray::ProxyActor",
        17: "ray::ServeReplica:pdserve:registry",
        21: "ray::ServeReplica:pdserve:router", 22: "ray::ServeReplica:pdserve:colocated",
        23: "VLLM::EngineCore", 24: "VLLM::Worker", 25: "ray::IDLE",
        26: "ray::ServeReplica:other:registry",
    }
    assert serving.control_plane_pids(titles, "pdserve") == [11, 12, 13, 14, 15, 16, 17]

    reniced: list = []
    monkeypatch.setattr("cluster.reaper.descendants", lambda pid: [])
    monkeypatch.setattr("cluster.cpu_affinity.renice", lambda pids, nice: reniced.append((list(pids), nice)))
    pinned = ServeConfig.model_validate({"ray": {"front_end_cores": [0]}})
    serving.renice_control_plane(pinned)
    assert reniced == [([], 10)]
    # Not pinned (the front end may use every core), or turned off: nothing is touched.
    reniced.clear()
    serving.renice_control_plane(ServeConfig())
    serving.renice_control_plane(ServeConfig.model_validate(
        {"ray": {"front_end_cores": [0], "control_plane_nice": None}}))
    assert reniced == []
