"""The Ray Serve application's router starts the re-planning loop that its config's `replan`
section asks for (pdserve/serve_app.py), and the loop decides and reports from the router's
live traffic. The router deployment's own constructor runs here without a Ray cluster: a
registry with no engines stands in for Serve's, so the loop sees traffic and no instances."""

from __future__ import annotations

import asyncio

import pytest
import yaml

pytest.importorskip("ray.serve")

from cluster.config import ConfigError, ServeConfig, load_config  # noqa: E402
from pdserve import placement  # noqa: E402
from router.handoff import RequestTrace  # noqa: E402


class _Remote:
    def __init__(self, value):
        self.value = value

    def remote(self):
        async def result():
            return self.value
        return result()


class NoEnginesRegistry:
    snapshot = _Remote([])


def _plan_yaml(tmp_path, synthetic_profile_path, tiny_model_dir) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "profile": str(synthetic_profile_path),
        "workload": {"lengths": {"kind": "fixed", "input_len": 100, "output_len": 10}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 4, "gpu_memory_gib": 16}}))
    return str(path)


def _config(replan: dict) -> ServeConfig:
    return load_config(None, {"slo": {"ttft_s": 0.2, "tpot_s": 0.03, "attainment": 0.9},
                              "router": {"port": 0}, "replan": replan})


async def _router(config: ServeConfig, monkeypatch):
    from pdserve import replicas
    from pdserve.serve_app import RouterDeployment

    monkeypatch.setattr(replicas, "node_identity", lambda: ("test-node", "127.0.0.1"))
    user_class = RouterDeployment.__mro__[1]  # the class under Serve's ASGI wrapper
    # Without Serve nobody awaits the replica's async __del__; the test stops it itself.
    probe = type("RouterProbe", (user_class,), {"__del__": lambda self: None})
    router = object.__new__(probe)
    await user_class.__init__(router, placement.count_free(config), NoEnginesRegistry())
    return router


def test_serve_router_starts_the_loop_and_reports_its_decisions(tmp_path, monkeypatch, synthetic_profile_path,
                                                                tiny_model_dir):
    config = _config({"enabled": True, "plan_config": _plan_yaml(tmp_path, synthetic_profile_path, tiny_model_dir),
                      "interval_s": 0.05, "tick_s": 0.05, "window_s": 10.0, "min_requests": 20})

    async def scenario():
        router = await _router(config, monkeypatch)
        try:
            assert router.replan is not None and router.replan.replanner.settings.observe_only
            assert router.replan.replanner.settings.max_units == 4  # the plan config's budget
            now = router.replan.clock()
            for i in range(40):  # 4 req/s over the last 10 s, every request on time
                t = RequestTrace(f"r{i}", 100, arrival_s=now - 10 + 0.25 * i, num_output_tokens=10)
                t.events["first_token"] = t.arrival_s + 0.05
                t.events["finish"] = t.arrival_s + 0.05 + 9 * 0.01
                router.deps.remember(t)
            for _ in range(200):
                if any(d.action == "resize" for d in router.replan.replanner.decisions):
                    break
                await asyncio.sleep(0.05)
        finally:
            await router.replan.stop()
            await router.stop()
        return router

    router = asyncio.run(scenario())
    resize = next(d for d in router.replan.replanner.decisions if d.action == "resize")
    # No engines registered: the loop asks for pools (observe-only: not applied).
    assert resize.num_prefill[0] == 0 and resize.num_prefill[1] >= 1 and not resize.applied
    assert "4.00 req/s observed" in resize.reason
    text = router.deps.metrics.exposition().decode()
    assert 'pdserve_replan_decisions_total{action="resize",applied="false"}' in text


def test_serve_router_without_replan_runs_no_loop(monkeypatch):
    async def scenario():
        router = await _router(_config({}), monkeypatch)
        await router.stop()
        return router

    assert asyncio.run(scenario()).replan is None


def test_replan_config_is_checked():
    with pytest.raises(ConfigError, match="plan_config"):
        _config({"enabled": True})
    with pytest.raises(ConfigError, match="router_replicas"):
        load_config(None, {"replan": {"enabled": True, "plan_config": "plan.yaml"},
                           "ray": {"router_replicas": 2}})
    assert _config({}).replan.observe_only and not _config({}).replan.enabled
