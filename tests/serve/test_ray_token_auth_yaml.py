"""Ray's token authentication is shown in both deployment YAMLs, with the variables the
installed Ray reads, and no token in the files themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_ray_reads_these_variables():
    setup = pytest.importorskip("ray._private.authentication.authentication_token_setup")
    assert setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    utils = pytest.importorskip("ray._private.authentication_test_utils")
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} <= set(utils._AUTH_ENV_VARS)


def test_every_kuberay_container_requires_the_token_from_a_secret():
    service = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert len(containers) == 3
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token  # never a literal token
        assert token["valueFrom"]["secretKeyRef"] == {"name": "pdserve-ray-auth", "key": "auth_token"}


def test_the_cluster_launcher_starts_every_node_in_token_mode_with_the_shared_token():
    cluster = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    # The token generated on the operator's machine, at Ray's default path on every node.
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
