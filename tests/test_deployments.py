"""The Prefect deployment file deploys to a real Prefect server and a deployment runs on a real worker.

Every entry of infra/prefect/prefect.yaml is checked against its flow's signature, deployed with
`prefect deploy` to the session's Prefect server with a process work pool, and the
dataset-preparation deployment is run on the bundled sample by `prefect worker start`: the flow
run completes and writes the dataset.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = REPO / "infra" / "prefect" / "prefect.yaml"


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_every_deployment_names_a_flow_and_only_its_parameters():
    config = yaml.safe_load(DEPLOYMENTS.read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        assert (REPO / deployment["entrypoint"].split(":")[0]).is_file()
        flow = _flow(deployment["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, (deployment["name"], set(deployment["parameters"]) - accepted)
        assert deployment["work_pool"]["name"]


def _prefect(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_deployments_deploy_and_the_prepare_deployment_runs_on_a_process_worker(prefect_harness, ray_cluster,
                                                                                 tmp_path):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    # The flow run joins the session's Ray (the embedded local Ray is the README's and the demo's to prove);
    # what is only read back from the server is read in this process (each `prefect` command costs seconds).
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    config = yaml.safe_load(DEPLOYMENTS.read_text())
    config["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    for deployment in config["deployments"]:
        deployment["work_pool"] = {"name": "dpe-test", "job_variables": {}}
    local_file = tmp_path / "prefect.yaml"
    local_file.write_text(yaml.safe_dump(config))

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="dpe-test", type="process",  # as `prefect work-pool create`
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(local_file), env=env)
    with get_client(sync_client=True) as client:
        for deployment in config["deployments"]:
            flow = _flow(deployment["entrypoint"])
            schema = client.read_deployment_by_name(f"{flow.name}/{deployment['name']}").parameter_openapi_schema
            for parameter in inspect.signature(flow.fn).parameters:  # the form Prefect renders has every one
                assert parameter in schema["properties"], (deployment["name"], parameter)

    output = tmp_path / "sample-dataset"
    params = {"sample": True, "output": str(output), "vox2_txt": [], "detector": "dlib", "retries": 0,
              "videos_per_batch": 6, "workdir": str(tmp_path / "work")}
    started = _prefect("deployment", "run", "prepare_dataset/prepare-voxceleb", "--params", json.dumps(params), env=env)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started).group(1)
    _prefect("worker", "start", "--pool", "dpe-test", "--type", "process", "--run-once", env=env, timeout=600)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    assert state.is_completed(), state
    summary = json.loads((output / "summary.json").read_text())
    assert summary["ok"] >= 4 and summary["failed"] >= 5
