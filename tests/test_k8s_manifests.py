"""Checks of the Kubernetes deployment in k8s/: schema, KubeRay's own rules, and the wiring between files.

Every KubeRay document (RayService, RayJob, RayCluster) is validated against the openAPIV3Schema of the
KubeRay v1.7.0 CRDs in shared/kuberay-crds (beside the repository), made strict: an object schema that lists
`properties` rejects any other key, so a typo such as `minReplica` fails here instead of being dropped silently by
the API server. The rest checks what the schema cannot: the operator's validation rules (name lengths, group
fields) and this project's choices (autoscaling to zero, shared volume, secrets, selectors). The worker groups
against the job spec's tiers are checked in tests/test_k8s_groups.py, the spot group in tests/test_k8s_spot.py,
who may connect in tests/test_k8s_security.py.

    pytest tests/test_k8s_manifests.py -q
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
if not CRD_DIR.is_dir():
    pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (shared/kuberay-crds beside the repo)", allow_module_level=True)

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the three CRDs are 60k lines

# From KubeRay ray-operator/controllers/ray/utils/constant.go (same in v1.4.2 and master, so in v1.7.0):
# MaxRayClusterNameLength = 53, i.e. 63 - len("-serve-svc"); MaxRayServiceNameLength = MaxRayJobNameLength =
# 53 - 6, because the operator appends a 6-character "-xxxxx" suffix to name the RayCluster it creates.
# validation.go (ValidateRay{Cluster,Service,Job}Metadata) also requires the name to be a DNS-1035 label.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayService": 47, "RayJob": 47}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes label syntax, which KubeRay's validateRayGroupLabels applies to Ray node labels (length aside).
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = re.compile(rf"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-\w.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-\w.]*)?[A-Za-z0-9])?$")
# KubeRay >= 1.5 takes Ray node labels and custom resources as top-level group fields (`labels`, `resources`);
# validation.go rejects rayStartParams["labels"], and GPUs come from the container's nvidia.com/gpu limit.
FORBIDDEN_START_PARAMS = {"labels", "resources", "num-gpus"}
CLUSTER_SPEC_KEY = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec", "RayCluster": None}
GPU = "nvidia.com/gpu"
DATA_DIR = "/mnt/moedisco"


@functools.cache
def manifests() -> tuple[tuple[str, dict], ...]:
    """(file name, document) for every document of every k8s/*.yaml."""
    return tuple(
        (path.name, doc)
        for path in sorted(K8S_DIR.glob("*.yaml"))
        for doc in yaml.load_all(path.read_text(), Loader=LOADER)
        if doc is not None
    )


def docs_of(*kinds: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc.get("kind") in kinds]


def the(kind: str) -> dict:
    (doc,) = docs_of(kind)
    return doc


def named(kind: str, name: str) -> dict:
    (doc,) = [doc for doc in docs_of(kind) if doc["metadata"]["name"] == name]
    return doc


def doc_id(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


KUBERAY_DOCS = [doc for _, doc in manifests() if str(doc.get("apiVersion", "")).startswith("ray.io/")]
CLUSTERS = [doc["spec"][key] if (key := CLUSTER_SPEC_KEY[doc["kind"]]) else doc["spec"] for doc in KUBERAY_DOCS]
CLUSTER_PARAMS = [pytest.param(cluster, id=doc_id(doc)) for doc, cluster in zip(KUBERAY_DOCS, CLUSTERS)]


def strict(schema: dict) -> dict:
    """The schema with unknown keys forbidden wherever properties are listed, and int-or-string made explicit."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], Draft7Validator]:
    """(apiVersion, kind) -> validator, for every version served by the CRDs."""
    validators = {}
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = Draft7Validator(schema)
    return validators


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
    assert validator is not None, f"no CRD in {CRD_DIR} serves {doc['apiVersion']} {doc['kind']}"
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]


def groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def pod_labels(group_name: str, group: dict) -> dict[str, str]:
    """Labels the pod ends up with: the template's plus those KubeRay sets (ray.io/cluster is generated)."""
    head = group_name == "head"
    kuberay = {
        "ray.io/node-type": "head" if head else "worker",
        "ray.io/group": "headgroup" if head else group_name,
        "ray.io/is-ray-node": "yes",
    }
    return {**group["template"].get("metadata", {}).get("labels", {}), **kuberay}


def port_names(group: dict) -> set[str]:
    return {port["name"] for port in ray_container(group).get("ports", [])}


def gpu_groups(cluster: dict, market: str = "on-demand") -> dict[str, dict]:
    """GPU worker groups of one capacity type (Ray node label `market`) by their Ray node label gpu_type (the cpu
    group, which carries that label too, has no GPU limit and is not one of them)."""
    workers = cluster.get("workerGroupSpecs", [])
    return {g["labels"]["gpu_type"]: g for g in workers
            if "gpu_type" in g.get("labels", {}) and g["labels"].get("market") == market
            and GPU in ray_container(g)["resources"].get("limits", {})}


# ---- every document ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "doc"), manifests(), ids=[f"{f}:{d.get('kind')}" for f, d in manifests()])
def test_every_document_names_its_kind(file: str, doc: dict) -> None:
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], f"{file}: apiVersion missing"
    assert isinstance(doc.get("kind"), str) and doc["kind"], f"{file}: kind missing"
    name = doc.get("metadata", {}).get("name", "")
    assert DNS1123_LABEL.match(name) and len(name) <= 63, f"{file}: bad metadata.name {name!r}"


def test_the_deployment_is_complete() -> None:
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"RayService", "RayJob", "ConfigMap", "Secret", "PersistentVolumeClaim", "Service"} <= kinds
    assert {"PodMonitor", "ServiceMonitor"} <= kinds


# ---- KubeRay documents: CRD schema and the operator's rules --------------------------------------------------------


@pytest.mark.parametrize("doc", KUBERAY_DOCS, ids=doc_id)
def test_kuberay_document_matches_crd_schema(doc: dict) -> None:
    assert schema_errors(doc) == []


def _group(service: dict, index: int) -> dict:
    return service["spec"]["rayClusterConfig"]["workerGroupSpecs"][index]


MISTAKES = {
    "typo in a worker group": lambda s: _group(s, 0).update(minReplica=0),
    "typo in the spec": lambda s: s["spec"].update(serveConfig="applications: []"),
    "typo in a container": lambda s: ray_container(_group(s, 1)).update(resource={}),
    "typo in autoscalerOptions": lambda s: s["spec"]["rayClusterConfig"]["autoscalerOptions"].update(idleTimeout=5),
    "string replica count": lambda s: _group(s, 0).update(maxReplicas="8"),
    "unknown autoscaler version": lambda s: s["spec"]["rayClusterConfig"]["autoscalerOptions"].update(version="v3"),
    "non-string Ray label": lambda s: _group(s, 0)["labels"].update(gpu_type=4090),
    "list as a quantity": lambda s: ray_container(_group(s, 0))["resources"]["limits"].update(cpu=[6]),
    # `ray start` parameters are strings: an unquoted num-cpus: 0 is refused by the API server.
    "non-string start parameter": lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_schema_check_rejects_mistakes(mistake: str) -> None:
    service = copy.deepcopy(the("RayService"))
    MISTAKES[mistake](service)
    assert schema_errors(service), f"{mistake} was not caught"


def test_quantities_accept_int_or_string() -> None:
    service = copy.deepcopy(the("RayService"))
    limits = ray_container(_group(service, 0))["resources"]["limits"]
    limits.update(cpu=6, memory="24Gi")
    assert schema_errors(service) == []


@pytest.mark.parametrize("doc", KUBERAY_DOCS, ids=doc_id)
def test_name_within_kuberay_limits(doc: dict) -> None:
    name = doc["metadata"]["name"]
    assert len(name) <= MAX_NAME_LENGTH[doc["kind"]], f"{name!r} is too long for a {doc['kind']}"
    assert DNS1035_LABEL.match(name), f"{name!r} is not a DNS-1035 label"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_worker_groups_follow_kuberay_rules(cluster: dict) -> None:
    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(names) == len(set(names)), f"duplicate worker group names {names}"
    for group in cluster["workerGroupSpecs"]:
        assert DNS1123_LABEL.match(group["groupName"]), group["groupName"]
        low, high = group["minReplicas"], group["maxReplicas"]
        assert low <= group.get("replicas", low) <= high, f"{group['groupName']}: replicas outside [min, max]"
    for name, group in groups(cluster):
        for key, value in group.get("labels", {}).items():
            assert LABEL_KEY.match(key) and LABEL_VALUE.match(value), f"{name}: bad Ray label {key}={value}"
        params = {key.lstrip("-") for key in group.get("rayStartParams", {})}
        assert not params & FORBIDDEN_START_PARAMS, f"{name}: {params & FORBIDDEN_START_PARAMS} in rayStartParams"
        containers = group["template"]["spec"]["containers"]
        assert containers, f"{name}: KubeRay needs at least one container"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_autoscaler_v2_scales_idle_groups_to_zero(cluster: dict) -> None:
    assert cluster.get("enableInTreeAutoscaling") is True
    options = cluster["autoscalerOptions"]
    assert options.get("version") == "v2"
    assert options.get("idleTimeoutSeconds", 0) > 0
    # KubeRay refuses both the field and the old env switch, and any restartPolicy but Never with v2.
    assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in ray_container(cluster["headGroupSpec"]).get("env", [])}
    for name, group in groups(cluster):
        assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", name
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, f"{group['groupName']} does not idle at 0"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_every_pod_shares_the_data_volume(cluster: dict) -> None:
    claims = {pvc["metadata"]["name"]: pvc for pvc in docs_of("PersistentVolumeClaim")}
    for name, group in groups(cluster):
        spec, container = group["template"]["spec"], ray_container(group)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == DATA_DIR]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{claim} is not shared"
        assert {"name": "MOEDISCO_DATA_DIR", "value": DATA_DIR} in container.get("env", []), name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{name}: no cpu/memory {kind}"


# ---- the control plane ---------------------------------------------------------------------------------------------


def test_serve_config_runs_the_api_on_the_head() -> None:
    service = the("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "service.serve:build_app" and app["route_prefix"] == "/"
    head = ray_container(service["spec"]["rayClusterConfig"]["headGroupSpec"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert config.get("http_options", {}).get("port", 8000) == ports["serve"] == 8000
    assert {6379, 8265, 8000, 8080} <= set(ports.values())


def test_the_api_is_pinned_to_the_head_label() -> None:
    from ray_cluster.local_cluster import CONTROL_PLANE_LABEL

    service = the("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["label_selector"] == CONTROL_PLANE_LABEL
    for kind, spec_key in (("RayService", "rayClusterConfig"), ("RayJob", "rayClusterSpec")):
        cluster = the(kind)["spec"][spec_key]
        assert CONTROL_PLANE_LABEL.items() <= cluster["headGroupSpec"]["labels"].items(), kind
        for group in cluster["workerGroupSpecs"]:
            assert not CONTROL_PLANE_LABEL.keys() & group.get("labels", {}).keys(), group["groupName"]


def secret_refs() -> list[dict]:
    refs, stack = [], [doc for _, doc in manifests()]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            refs += [node["secretKeyRef"]] if "secretKeyRef" in node else []
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    return refs


def test_secrets_come_from_the_example_secret() -> None:
    secret = named("Secret", "moedisco-secrets")
    values = secret["stringData"]
    assert all("CHANGE-ME" in value for value in values.values()), "the example must hold placeholders only"
    for ref in secret_refs():
        assert ref["name"] == "moedisco-secrets" and ref["key"] in values, ref
    head = ray_container(the("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"])
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") for e in head["env"]}
    assert env["MOEDISCO_API_TOKEN"] == "api-token" and env["MOEDISCO_DATABASE_URL"] == "database-url"


def test_service_and_monitors_select_real_pods() -> None:
    control = the("RayService")["spec"]["rayClusterConfig"]
    service = the("Service")
    selector = service["spec"]["selector"]
    assert selector.get("ray.io/node-type") == "head"
    for name, group in groups(control):
        matches = selector.items() <= pod_labels(name, group).items()
        assert matches == (name == "head"), f"Service selector {'misses' if name == 'head' else 'matches'} {name}"
    head_group = the("RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert not selector.items() <= pod_labels("head", head_group).items(), "the Service also selects RayJob heads"
    assert {str(p["targetPort"]) for p in service["spec"]["ports"]} <= port_names(control["headGroupSpec"])

    all_groups = [(name, group) for cluster in CLUSTERS for name, group in groups(cluster)]
    pod_monitor = the("PodMonitor")["spec"]
    for name, group in all_groups:
        assert pod_monitor["selector"]["matchLabels"].items() <= pod_labels(name, group).items(), name
        assert "metrics" in port_names(group), f"{name}: no `metrics` port to scrape"
    for endpoint in pod_monitor["podMetricsEndpoints"]:
        assert any(endpoint["port"] in port_names(g) for _, g in all_groups), endpoint["port"]

    service_monitor = the("ServiceMonitor")["spec"]
    assert service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in service_monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e.get("path") for e in service_monitor["endpoints"]} == {"/metrics"}


# ---- the batch job ---------------------------------------------------------------------------------------------


def job_spec_text() -> str:
    """The spec file the RayJob's entrypoint reads, found through the ConfigMap mount of the group its driver runs
    on (the one offering its `entrypointResources`)."""
    import json

    job = the("RayJob")
    path = Path(job["spec"]["entrypoint"].split()[2])
    wanted = json.loads(job["spec"]["entrypointResources"])
    (group,) = [group for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                if wanted.keys() <= group.get("resources", {}).keys()]
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    mounts = [m for m in ray_container(group)["volumeMounts"] if "configMap" in volumes[m["name"]]]
    (mount,) = [m for m in mounts if path.parent == Path(m["mountPath"])]
    config_maps = {c["metadata"]["name"]: c for c in docs_of("ConfigMap")}
    return config_maps[volumes[mount["name"]]["configMap"]["name"]]["data"][path.name]


def test_rayjob_runs_the_spec_from_its_config_map() -> None:
    job = the("RayJob")["spec"]
    assert job["entrypoint"] == "moedisco run /mnt/moedisco/specs/job.yaml --runner ray"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    spec = yaml.safe_load(job_spec_text())
    assert spec["output_dir"].startswith(f"{DATA_DIR}/") and spec["data"]["train"].startswith(f"{DATA_DIR}/")
    assert spec["model"] == {"arch": "qwen2_moe", "num_experts": 4} and spec["name"]


# ---- the image --------------------------------------------------------------------------------------------------


def test_image_ray_version_matches_the_clusters() -> None:
    dockerfile = (K8S_DIR / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\S+-gpu$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"pip install .*--constraint \S+ \.$", dockerfile, flags=re.MULTILINE), "project not installed"
    assert {cluster["rayVersion"] for cluster in CLUSTERS} == {ray_version}
    constraints = REPO / "constraints.txt"  # the tested versions, which the image installs with
    pins = re.findall(r"^ray==(\S+)$", constraints.read_text(), flags=re.MULTILINE) if constraints.exists() else []
    assert set(pins) <= {ray_version}, f"constraints.txt pins ray {pins}, the image has {ray_version}"
    pods = [g["template"]["spec"] for cluster in CLUSTERS for _, g in groups(cluster)]
    images = {container["image"] for pod in pods for container in pod["containers"]}
    assert len(images) == 1, f"Ray pods run different images: {images}"
