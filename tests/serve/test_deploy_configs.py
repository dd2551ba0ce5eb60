"""The deployment YAMLs (Serve config, cluster launcher, KubeRay) are valid for Ray's own
schemas and describe one application; the builder turns a pdserve config into that
application's deployments with the placement the config asks for. No Ray cluster needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

serve_schema = pytest.importorskip("ray.serve.schema")

from cluster.config import ConfigError, load_config  # noqa: E402
from pdserve import placement  # noqa: E402
from pdserve.serve_app import build_app, parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "deploy/ray/serve.yaml"
CLUSTER_YAML = ROOT / "deploy/ray/cluster.yaml"
RAYSERVICE_YAML = ROOT / "deploy/kuberay/rayservice.yaml"


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


def _the_app(config: dict) -> dict:
    [app] = config["applications"]
    return app


def test_serve_yaml_is_a_valid_serve_config_of_pdserve():
    raw = _serve_config()
    schema = serve_schema.ServeDeploySchema.model_validate(raw)
    [app] = schema.applications
    assert app.import_path == "pdserve.serve_app:build_app"
    assert app.external_scaler_enabled  # `pdserve scale` resizes pools in place
    config = parse_args(app.args)  # the application args are a pdserve config
    assert config.ray.app_name == app.name
    assert config.placement.affinity == "low"


def test_rayservice_carries_the_same_application():
    service = yaml.safe_load(RAYSERVICE_YAML.read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_schema.ServeDeploySchema.model_validate(inner)
    assert inner["applications"] == _serve_config()["applications"]
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"


def _required_node_resources() -> set[str]:
    args = _the_app(_serve_config())["args"]
    return {r for role in ("prefill", "decode") for r in args[role].get("node_resources", {})}


def test_cluster_yaml_is_valid_for_the_cluster_launcher_and_offers_the_pools_resources():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0  # CPU head
    offered = {r for t in types.values() for r in t.get("resources", {})}
    assert _required_node_resources() <= offered
    assert any("pdserve" in cmd for cmd in cluster["setup_commands"])
    # KubeRay's worker groups offer the same resources.
    service = yaml.safe_load(RAYSERVICE_YAML.read_text())
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    kuberay = {r for g in groups for r in json.loads(json.loads(g["rayStartParams"]["resources"]))}
    assert _required_node_resources() <= kuberay


def _deployments(app) -> dict:
    """name -> Deployment of a built application (walks the bound arguments)."""
    from ray.serve.deployment import Application

    found = {}

    def walk(a):
        d = a._bound_deployment
        found[d.name] = d
        for arg in list(d.init_args) + list(d.init_kwargs.values()):
            if isinstance(arg, Application):
                walk(arg)

    walk(app)
    return found


def test_builder_places_each_instance_in_one_packed_placement_group():
    args = _the_app(_serve_config())["args"]
    args["prefill"].update(tensor_parallel_size=2, num_gpus=2, num_cpus=4)
    deployments = _deployments(build_app(args))
    assert set(deployments) == {"router", "registry", "prefill", "decode"}
    prefill = deployments["prefill"]
    assert prefill.num_replicas == 1
    assert prefill._deployment_config.health_check_period_s == 2.0
    opts = prefill._replica_config
    assert opts.placement_group_strategy == "STRICT_PACK"
    assert opts.placement_group_bundles == [
        {"CPU": 2.0, "GPU": 1.0, "pdserve_prefill_node": 0.01}, {"CPU": 2.0, "GPU": 1.0}]
    assert opts.ray_actor_options["resources"] == {"pdserve_prefill_node": 0.01}
    decode = deployments["decode"]._replica_config
    assert decode.placement_group_bundles == [{"CPU": 1.0, "pdserve_decode_node": 0.01}]


def test_pool_size_is_not_a_replica_argument():
    """Resizing a pool must not change any replica's constructor arguments (Serve would
    restart every replica); only num_replicas differs."""
    args = _the_app(_serve_config())["args"]
    small = _deployments(build_app(args))
    args["decode"]["num_instances"] = 3
    big = _deployments(build_app(args))
    assert big["decode"].num_replicas == 3 and small["decode"].num_replicas == 1
    from ray.serve.deployment import Application

    for name in ("router", "prefill", "decode"):
        plain = [[a for a in d[name].init_args if not isinstance(a, Application)] for d in (small, big)]
        assert plain[0] == plain[1] and plain[0]


def test_labels_select_nodes_for_every_bundle():
    config = load_config(None, {"decode": {"node_labels": {"ray.io/accelerator-type": "H100"},
                                           "tensor_parallel_size": 2}})
    opts = placement.engine_deployment_options(config, "decode")
    assert opts["placement_group_bundle_label_selector"] == [{"ray.io/accelerator-type": "H100"}] * 2


@pytest.mark.parametrize("change, field", [
    ({"decode": {"num_instances": "many"}}, "decode.num_instances"),
    ({"placement": {"affinity": "sideways"}}, "placement.affinity"),
    ({"prefill": {"node_resources": {"a": 1}}, "decode": {"node_resources": {"a": 1}},
      "placement": {"affinity": "low"}}, "placement.affinity 'low'"),
])
def test_invalid_config_is_one_line_naming_the_field(change, field):
    args = _the_app(_serve_config())["args"]
    for key, value in change.items():
        args[key] = {**args.get(key, {}), **value}
    with pytest.raises(ConfigError) as e:
        build_app(args)
    message = str(e.value)
    assert "\n" not in message and field in message


def test_serve_build_rejects_a_bad_config_in_one_line():
    """What `serve run`/`serve deploy` show at deploy time: Serve's own builder path."""
    raw = _serve_config()
    _the_app(raw)["args"]["decode"]["num_instances"] = -1
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray._common.utils import import_attr

    builder = import_attr(_the_app(raw)["import_path"])
    with pytest.raises(ConfigError) as e:
        call_user_app_builder_with_args_if_necessary(builder, _the_app(raw)["args"])
    assert str(e.value).count("\n") == 0 and "decode.num_instances" in str(e.value)


def test_plan_output_deploys_as_is(tmp_path):
    """`pdserve plan --output` writes a pdserve config; the Serve builder takes it as is."""
    from tests.planner.conftest import SYNTHETIC_PROFILE, TINY_CONFIG

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(SYNTHETIC_PROFILE))
    out = tmp_path / "plan.yaml"
    from pdserve.cli import main

    code = main(["plan", "--model", str(model), "--profile", str(profile), "--input-len-range", "256",
                 "768", "--output-len-range", "16", "112", "--ttft-s", "0.2", "--tpot-s", "0.04",
                 "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gib", "16",
                 "--num-requests", "300", "--num-seeds", "1", "--output", str(out)])
    assert code == 0
    plan = load_config(out)
    deployments = _deployments(build_app({"config": str(out)}))  # serve run ... config=plan.yaml
    for role in ("prefill", "decode"):
        pool = getattr(plan, role)
        assert deployments[role].num_replicas == pool.num_instances
        bundles = deployments[role]._replica_config.placement_group_bundles
        assert len(bundles) == pool.tensor_parallel_size * pool.pipeline_parallel_size
        assert sum(b.get("GPU", 0) for b in bundles) == pool.num_gpus
