"""Who may connect to the clusters of k8s/: Ray token authentication, the API's secrets on the head only, no Service
for the dashboard, and NetworkPolicies that admit each caller to the ports it needs only.

    pytest tests/test_k8s_security.py -q
"""

from __future__ import annotations

import pytest

from tests.test_k8s_manifests import (
    CLUSTER_PARAMS,
    CLUSTER_SPEC_KEY,
    CLUSTERS,
    doc_id,
    docs_of,
    groups,
    named,
    pod_labels,
    port_names,
    ray_container,
    the,
)

# ---- who may connect: Ray token auth, the API's secrets, the dashboard, the network policy ----------------------
#
# Anyone who reaches a Ray port of a cluster without authentication can run code on it. The clusters require Ray's
# token, the API's secrets stay on the head, the dashboard is in no Service, and NetworkPolicies admit each caller
# to the ports it needs only. The policy checks below evaluate the NetworkPolicies of k8s/ the way Kubernetes does
# (`admits`), for the pods the two clusters will have (`pod_labels`) and the callers they meet.

NAMESPACE = {"kubernetes.io/metadata.name": "moedisco"}  # where the manifests are applied (k8s/README.md)
OUTSIDE = None  # a caller that is not a pod of the cluster: a load balancer, another network
OTHER_POD = {"labels": {"app": "web"}, "namespace": NAMESPACE}  # any other pod of the namespace
OPERATOR = {"labels": {"app.kubernetes.io/component": "kuberay-operator", "app.kubernetes.io/name": "kuberay-operator"},
            "namespace": {"kubernetes.io/metadata.name": "kuberay-system"}}
FAKE_OPERATOR = {"labels": OPERATOR["labels"], "namespace": NAMESPACE}  # the operator's labels, in the app namespace
PROMETHEUS = {"labels": {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus"},
              "namespace": {"kubernetes.io/metadata.name": "monitoring"}}
SUBMITTER = {"labels": {"ray.io/originated-from-crd": "RayJob", "job-name": "moedisco-tiny",
                        "batch.kubernetes.io/job-name": "moedisco-tiny"}, "namespace": NAMESPACE}
RAY_WORKER_PORT = 10002  # a port Ray picks for a worker process: in no container's port list
SECRET_NAMES = {"MOEDISCO_API_TOKEN", "MOEDISCO_DATABASE_URL"}


def cluster_of(kind: str) -> dict:
    return the(kind)["spec"][CLUSTER_SPEC_KEY[kind]]


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector applied to `labels` ({} selects everything)."""
    selector = selector or {}
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {"In": present and labels.get(key) in values, "NotIn": not present or labels[key] not in values,
              "Exists": present, "DoesNotExist": not present}[operator]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, source: dict | None) -> bool:
    if "ipBlock" in peer:
        raise AssertionError("ipBlock peers are not modelled here; describe callers by pod and namespace")
    if source is None:  # a pod or namespace selector never matches a caller outside the pod network
        return False
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], source["namespace"])
    else:  # a bare podSelector means pods of the policy's own namespace
        in_namespace = source["namespace"] == NAMESPACE
    return in_namespace and selects(peer.get("podSelector"), source["labels"])


def _port_matches(rule_ports: list[dict] | None, port: int, name: str | None) -> bool:
    if not rule_ports:
        return True
    for rule_port in rule_ports:
        if rule_port.get("protocol", "TCP") != "TCP":
            continue
        wanted = rule_port.get("port")
        if wanted is None or wanted == port or (name is not None and wanted == name):
            return True
        if isinstance(wanted, int) and wanted <= port <= rule_port.get("endPort", wanted):
            return True
    return False


def network_policies() -> list[dict]:
    return docs_of("NetworkPolicy")


def isolating_policies(labels: dict[str, str]) -> list[dict]:
    """The NetworkPolicies that restrict ingress to a pod with these labels."""
    return [policy for policy in network_policies()
            if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
            and selects(policy["spec"]["podSelector"], labels)]


def admits(group_name: str, group: dict, port: int | str, source: dict | None) -> bool:
    """Whether a connection from `source` to `port` (a number, or a container port's name) of the group's pod is
    let through by the NetworkPolicies of k8s/ (a pod that no policy isolates takes everything)."""
    ports = {p["name"]: p["containerPort"] for p in ray_container(group).get("ports", [])}
    number, name = (ports[port], port) if isinstance(port, str) else (port, {v: k for k, v in ports.items()}.get(port))
    policies = isolating_policies(pod_labels(group_name, group))
    if not policies:
        return True
    return any(_port_matches(rule.get("ports"), number, name)
               and (not rule.get("from") or any(_peer_matches(peer, source) for peer in rule["from"]))
               for policy in policies for rule in policy["spec"].get("ingress", []))


def as_caller(group_name: str, group: dict) -> dict:
    return {"labels": pod_labels(group_name, group), "namespace": NAMESPACE}


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_clusters_require_the_ray_token(cluster: dict) -> None:
    # authOptions (KubeRay >= 1.5.1, Ray >= 2.52): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every Ray container.
    assert cluster.get("authOptions", {}).get("mode") == "token"
    assert not cluster["authOptions"].get("enableK8sTokenAuth"), "unsupported for RayService and RayJob"
    for name, group in groups(cluster):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            # A template's own value would win over the operator's (it only adds what is missing).
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & env.keys(), name


def test_the_control_plane_token_has_a_stable_secret() -> None:
    # Not generated per RayCluster: the token survives cluster upgrades, and clients know where to read it.
    secret_name = cluster_of("RayService")["authOptions"]["secretName"]
    secret = named("Secret", secret_name)
    assert set(secret["stringData"]) == {"auth_token"}  # the key KubeRay reads
    assert "CHANGE-ME" in secret["stringData"]["auth_token"], "the example must hold a placeholder only"
    assert secret_name != "moedisco-secrets", "workers get the Ray token; they must not share a Secret with the API's"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_no_secret_reaches_a_worker_pod(cluster: dict) -> None:
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            names = {e["name"] for e in container.get("env", [])}
            assert not names & SECRET_NAMES, f"{group['groupName']}: {names & SECRET_NAMES}"
            assert not [e for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert not [e for e in container.get("envFrom", []) if "secretRef" in e], group["groupName"]
        assert not [v for v in spec.get("volumes", []) if "secret" in v or "projected" in v], group["groupName"]


def test_only_the_control_plane_head_holds_the_api_secrets() -> None:
    head = ray_container(cluster_of("RayService")["headGroupSpec"])
    assert SECRET_NAMES <= {e["name"] for e in head["env"]}


def test_no_service_exposes_the_dashboard() -> None:
    dashboard_ports = {"dashboard", 8265, "8265"}
    for service in docs_of("Service"):
        for port in service["spec"]["ports"]:
            assert not {port.get("name"), port["port"], port.get("targetPort")} & dashboard_ports, doc_id(service)
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", doc_id(service)


def test_network_policies_isolate_every_ray_pod() -> None:
    assert network_policies(), "no NetworkPolicy: every pod that reaches a Ray port can run code on the cluster"
    for policy in network_policies():
        assert policy["apiVersion"] == "networking.k8s.io/v1" and "namespace" not in policy["metadata"]
    for cluster in CLUSTERS:
        for name, group in groups(cluster):
            assert isolating_policies(pod_labels(name, group)), f"{name}: no NetworkPolicy restricts its ingress"


def test_the_api_is_open_on_the_control_plane_head_only() -> None:
    control, job = cluster_of("RayService"), cluster_of("RayJob")
    for caller in (OUTSIDE, OTHER_POD, PROMETHEUS, OPERATOR):
        assert admits("head", control["headGroupSpec"], "serve", caller)
        assert not admits("head", job["headGroupSpec"], 8000, caller)
        for cluster in (control, job):
            for group in cluster["workerGroupSpecs"]:
                assert not admits(group["groupName"], group, 8000, caller), f"{group['groupName']} takes 8000"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_strangers_reach_no_ray_port(cluster: dict) -> None:
    for name, group in groups(cluster):
        ports = [p["name"] for p in ray_container(group)["ports"] if p["name"] != "serve"] + [RAY_WORKER_PORT, 52365]
        for port in ports:
            for caller in (OUTSIDE, OTHER_POD, FAKE_OPERATOR):
                assert not admits(name, group, port, caller), f"{name}:{port} is open to {caller}"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_the_dashboard_admits_the_operator_only(cluster: dict) -> None:
    head = cluster["headGroupSpec"]
    assert admits("head", head, "dashboard", OPERATOR)
    assert not admits("head", head, "gcs-server", OPERATOR) and not admits("head", head, "client", OPERATOR)
    for group in cluster["workerGroupSpecs"]:
        assert not admits(group["groupName"], group, RAY_WORKER_PORT, OPERATOR)


def test_only_the_rayjob_submitter_reaches_its_head() -> None:
    assert admits("head", cluster_of("RayJob")["headGroupSpec"], "dashboard", SUBMITTER)
    assert not admits("head", cluster_of("RayJob")["headGroupSpec"], "gcs-server", SUBMITTER)
    assert not admits("head", cluster_of("RayService")["headGroupSpec"], "dashboard", SUBMITTER)
    name = the("RayJob")["metadata"]["name"]
    assert name in str(named("NetworkPolicy", "moedisco-batch-job-head")), "the submitter rule names another RayJob"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_head_and_workers_of_one_cluster_reach_each_other(cluster: dict) -> None:
    for source_name, source in groups(cluster):
        for name, group in groups(cluster):
            for port in [p["name"] for p in ray_container(group)["ports"]] + [RAY_WORKER_PORT]:
                assert admits(name, group, port, as_caller(source_name, source)), f"{source_name} -> {name}:{port}"


def test_the_two_deployments_do_not_reach_each_other() -> None:
    control, job = cluster_of("RayService"), cluster_of("RayJob")
    for first, second in ((control, job), (job, control)):
        for source_name, source in groups(first):
            for name, group in groups(second):
                assert not admits(name, group, "gcs-server" if name == "head" else RAY_WORKER_PORT,
                                  as_caller(source_name, source)), f"{source_name} -> {name}"


def test_prometheus_scrapes_the_metrics_ports_only() -> None:
    endpoints = {endpoint["port"] for endpoint in the("PodMonitor")["spec"]["podMetricsEndpoints"]}
    for cluster in CLUSTERS:
        for name, group in groups(cluster):
            for port in port_names(group) - {"serve"}:  # the API takes every caller (above)
                assert admits(name, group, port, PROMETHEUS) == (port in endpoints), f"{name}:{port}"
