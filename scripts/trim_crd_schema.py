"""Cut a KubeRay CRD down to the schema our manifest tests need (deploy/schemas/*.json).

The CRD embeds whole PodTemplateSpecs and Services (about 1 MB of YAML); tests validate those parts with
kubernetes-validate against Kubernetes' own schemas, so here they become plain objects, and status goes.
Usage: python scripts/trim_crd_schema.py ray.io_rayservices.yaml v1 deploy/schemas/rayservice-v1.json
"""

from __future__ import annotations

import json
import sys

import yaml

_EMBEDDED = ("template", "headService", "volumeClaimTemplates", "submitterPodTemplate")


def trim(node):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {k: ({"type": "object", "description": "checked as its Kubernetes kind by the tests"}
                                if k in _EMBEDDED else trim(v)) for k, v in value.items() if k != "status"}
            else:
                out[key] = trim(value)
        return out
    if isinstance(node, list):
        return [trim(v) for v in node]
    return node


def main(crd_path: str, version: str, out_path: str) -> None:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    with open(out_path, "w") as f:
        json.dump(trim(schema), f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
