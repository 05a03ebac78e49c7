"""Every deployment file is valid: YAML loads, each kind has its required fields, images are the one
the Dockerfile builds, and every command line it runs is one `portrait` accepts.

(The Prefect deployments are checked against the flow signatures and deployed to a real Prefect
server in tests/test_deployments.py.)
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE = re.compile(r"dpe-portrait:(gpu|cpu)")


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _parses(command: str) -> None:
    words = shlex.split(command)
    assert words[0] == "portrait", command
    build_parser().parse_args(words[1:])  # exits (fails the test) on an unknown option or a bad value


def test_the_dockerfile_builds_the_project_with_its_entry_point():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11" in text
    for source in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["portrait"]' in text and "portrait" in scripts
    assert "ffmpeg" in text and "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text


def test_the_ray_cluster_has_a_head_cpu_workers_and_gpu_workers():
    (config,) = _documents(INFRA / "ray" / "cluster.yaml")
    for field in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker"):
        assert field in config, field
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert IMAGE.fullmatch(config["docker"]["image"].split()[0])
    workers = [node for name, node in types.items() if name != config["head_node_type"]]
    assert any(node.get("resources", {}).get("GPU") for node in workers), "no GPU workers for train and edit"
    assert any(not node.get("resources", {}).get("GPU") for node in workers), "no CPU workers for prepare"


def _kuberay() -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for doc in _documents(path):
            assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"], path
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def test_kuberay_has_a_cluster_with_cpu_and_gpu_groups():
    (cluster,) = _kuberay()["RayCluster"]
    spec = cluster["spec"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [group["template"]["spec"]["containers"][0] for group in spec["workerGroupSpecs"]]
    assert all(IMAGE.fullmatch(container["image"]) for container in containers)
    limits = [group["template"]["spec"]["containers"][0]["resources"]["limits"] for group in spec["workerGroupSpecs"]]
    assert any("nvidia.com/gpu" in limit for limit in limits) and any("nvidia.com/gpu" not in l for l in limits)


@pytest.mark.parametrize("command", ["train", "edit"])
def test_kuberay_jobs_run_commands_portrait_accepts_on_that_cluster(command):
    cluster = _kuberay()["RayCluster"][0]["metadata"]["name"]
    jobs = [job for job in _kuberay()["RayJob"] if job["spec"]["entrypoint"].split()[1] == command]
    assert len(jobs) == 1, f"one RayJob for {command}"
    assert jobs[0]["spec"]["clusterSelector"]["ray.io/cluster"] == cluster
    _parses(jobs[0]["spec"]["entrypoint"])


def test_commands_in_the_deployment_comments_are_ones_portrait_accepts():
    for path in [*INFRA.rglob("*.yaml"), INFRA / "docker" / "Dockerfile"]:
        for command in re.findall(r"(portrait (?:prepare|train|edit|demo|inspect)\b[^`\n]*)", path.read_text()):
            if "..." not in command:
                _parses(command.strip())
