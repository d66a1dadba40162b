"""Kubernetes delivery: the Helm chart through the real Helm SDK, objects against the
Kubernetes 1.29 schemas, the webhook over real TLS, and template == webhook injection.

No cluster and no container engine run here: what a cluster would do with these objects
is checked against its published schemas (kubernetes-validate) instead.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.app import free_port
from sidecar.k8s.inject import SidecarDefaults
from sidecar.k8s.webhook import load_defaults, review

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm/dotmac-sidecar"
KUBE = "1.29.0"
# kinds from CRDs, which kubernetes-validate has no schema for; checked by hand below
CRD_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cert-manager and PodMonitor": {
        "injector": {"tls": {"source": "cert-manager"}},
        "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
    },
    "static injection only, no config ConfigMap": {
        "injector": {"enabled": False},
        "sidecar": {"configConfigMap": "", "vaultRole": "orders", "logLevel": "DEBUG"},
        "policies": {"files": {"orders.yaml": "rules: []\n"}},
    },
    "one replica, inject by default, own issuer": {
        "injector": {
            "replicas": 1,
            "injectByDefault": True,
            "failurePolicy": "Ignore",
            "namespaceSelector": {
                "matchExpressions": [
                    {
                        "key": "kubernetes.io/metadata.name",
                        "operator": "NotIn",
                        "values": ["kube-system"],
                    }
                ]
            },
            "tls": {
                "source": "cert-manager",
                "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
            },
        },
        "sidecar": {
            "image": {"repository": "registry.local/dotmac", "tag": "0.1.0-rc1"},
            "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}},
        },
    },
}


def render(
    chart: Path, values: dict[str, Any], name: str = "dotmac", namespace: str = "dotmac-system"
) -> list[dict[str, Any]]:
    with helm.Chart.load(str(chart)) as loaded:
        loaded.validate_schema(values)
        manifests = loaded.render(values, name=name, namespace=namespace)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("label", list(VALUE_SETS))
def test_chart_renders_lints_and_validates_against_kubernetes_schemas(label: str) -> None:
    values = VALUE_SETS[label]
    report = helm.lint(str(CHART), values, kube_version=f"v{KUBE}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report
    docs = render(CHART, values)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict), doc
            continue
        kubernetes_validate.validate(doc, KUBE, strict=True)  # raises on any schema error

    kinds = {d["kind"] for d in docs}
    if values.get("injector", {}).get("enabled", True):
        assert {
            "Deployment",
            "Service",
            "ServiceAccount",
            "MutatingWebhookConfiguration",
            "ConfigMap",
        } <= kinds
        hook = by_kind(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]
        assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
        assert hook["clientConfig"]["service"]["path"] == "/mutate"
        assert hook["objectSelector"]["matchExpressions"][0]["values"] == ["false"]
        injector = by_kind(docs, "Deployment")[0]["spec"]["template"]
        assert injector["metadata"]["labels"]["sidecar.dotmac.io/inject"] == "false"
        container = injector["spec"]["containers"][0]
        assert container["command"] == ["dotmac-sidecar", "inject-webhook"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        tls = values.get("injector", {}).get("tls", {}).get("source", "helm")
        if tls == "helm":
            secret = by_kind(docs, "Secret")[0]
            ca = base64.b64decode(secret["data"]["ca.crt"])
            assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
            cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert (
                "dotmac-dotmac-sidecar-injector.dotmac-system.svc"
                in names.value.get_values_for_type(x509.DNSName)
            )
            assert cert.issuer == x509.load_pem_x509_certificate(ca).subject
        else:
            assert (
                "cert-manager.io/inject-ca-from"
                in by_kind(docs, "MutatingWebhookConfiguration")[0]["metadata"]["annotations"]
            )
            assert by_kind(docs, "Certificate")
        replicas = values.get("injector", {}).get("replicas", 2)
        assert bool(by_kind(docs, "PodDisruptionBudget")) == (replicas > 1)
    else:
        assert "MutatingWebhookConfiguration" not in kinds and "Deployment" not in kinds
    policy = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "dotmac-policy")
    assert "default.yaml" in policy["data"]
    for text in policy["data"].values():
        yaml.safe_load(text)


def test_schema_refuses_bad_values() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for bad in (
            {"sidecar": {"listenPort": 70000}},
            {"injector": {"tls": {"source": "self"}}},
            {"sidecar": {"policyConfigMap": "Not_A_Name"}},
            {"typo": True},
        ):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def chart_defaults(values: dict[str, Any] | None = None) -> tuple[SidecarDefaults, bool]:
    """The webhook's defaults exactly as the chart renders them into its ConfigMap."""
    docs = render(CHART, values or {})
    config = next(d for d in by_kind(docs, "ConfigMap") if "injector.yaml" in d["data"])
    return load_defaults_text(config["data"]["injector.yaml"])


def load_defaults_text(text: str) -> tuple[SidecarDefaults, bool]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_defaults(Path(f.name))


def webhook_example_pod() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "deploy/example-webhook/app.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "orders", **copy.deepcopy(template["metadata"])},
        "spec": copy.deepcopy(template["spec"]),
    }


def admission(
    pod: dict[str, Any], uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002"
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "orders",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }


def apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    answer = response["response"]
    if "patch" not in answer:
        return pod
    assert answer["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(answer["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
    return patched


def test_webhook_injects_a_valid_native_sidecar_and_renames_the_port() -> None:
    defaults, _ = chart_defaults()
    pod = webhook_example_pod()
    response = review(admission(pod), defaults)
    assert response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["response"]["allowed"] is True
    injected = apply(pod, response)
    kubernetes_validate.validate(injected, KUBE, strict=True)

    spec = injected["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "dotmac-sidecar" and sidecar["restartPolicy"] == "Always"
    assert [p["name"] for p in sidecar["ports"]] == ["http", "dotmac-admin"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["resources"]["limits"] and sidecar["resources"]["requests"]
    assert "--upstream" in sidecar["args"]
    assert sidecar["args"][sidecar["args"].index("--upstream") + 1] == "http://127.0.0.1:8080"
    assert {"name": "DOTMAC_VAULT_ROLE", "value": "orders"} in sidecar["env"]
    app = spec["containers"][0]
    assert [p["name"] for p in app["ports"]] == ["http-app"]
    assert app["readinessProbe"]["httpGet"]["port"] == "http-app"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dotmac-policy"]["configMap"]["name"] == "orders-policy"
    assert volumes["dotmac-config"]["configMap"]["name"] == "orders-sidecar"
    assert injected["metadata"]["annotations"]["sidecar.dotmac.io/status"] == "injected"

    # idempotent: the injected pod, reviewed again, gets no second sidecar
    again = review(admission(injected), defaults)
    assert again["response"]["allowed"] is True and "patch" not in again["response"]


def test_pods_without_the_annotation_or_opted_out_are_left_alone() -> None:
    defaults, _ = chart_defaults()
    pod = webhook_example_pod()
    del pod["metadata"]["annotations"]
    response = review(admission(pod), defaults)
    assert response["response"] == {"uid": response["response"]["uid"], "allowed": True}
    pod["metadata"]["annotations"] = {"sidecar.dotmac.io/inject": "false"}
    assert "patch" not in review(admission(pod), defaults, inject_by_default=True)["response"]
    del pod["metadata"]["annotations"]
    by_default = review(admission(pod), defaults, inject_by_default=True)
    assert "patch" in by_default["response"]
    # a pod with no metadata annotations and no volumes gets both added
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }
    patched = apply(bare, review(admission(bare), defaults, inject_by_default=True))
    kubernetes_validate.validate(patched, KUBE, strict=True)
    assert patched["spec"]["initContainers"][0]["name"] == "dotmac-sidecar"


@pytest.mark.parametrize(
    ("annotations", "says"),
    [
        ({"sidecar.dotmac.io/inject": "yes"}, 'sidecar.dotmac.io/inject must be "true" or "false"'),
        (
            {"sidecar.dotmac.io/upstream-port": "http"},
            "sidecar.dotmac.io/upstream-port must be a port number",
        ),
        (
            {"sidecar.dotmac.io/upstream-port": "70000"},
            "sidecar.dotmac.io/upstream-port must be a port number",
        ),
        ({"sidecar.dotmac.io/upstream-port": "8000"}, "is the sidecar's own port"),
        (
            {"sidecar.dotmac.io/policy-configmap": "Bad_Name"},
            "sidecar.dotmac.io/policy-configmap must be a ConfigMap name",
        ),
        (
            {"sidecar.dotmac.io/config-configmap": "../x"},
            "sidecar.dotmac.io/config-configmap must be a ConfigMap name",
        ),
        (
            {"sidecar.dotmac.io/vault-role": "a role; rm"},
            "sidecar.dotmac.io/vault-role must be a Vault role name",
        ),
        (
            {"sidecar.dotmac.io/upstrem-port": "8080"},
            "unknown annotation sidecar.dotmac.io/upstrem-port",
        ),
    ],
)
def test_malformed_annotations_are_refused_with_a_clear_message(
    annotations: dict[str, str], says: str
) -> None:
    defaults, _ = chart_defaults()
    pod = webhook_example_pod()
    pod["metadata"]["annotations"].update(annotations)
    response = review(admission(pod), defaults)["response"]
    assert response["allowed"] is False and "patch" not in response
    assert says in response["status"]["message"], response
    assert response["status"]["message"].startswith("dotmac-sidecar injection: ")


def annotated_pod_review(spec: dict[str, Any]) -> dict[str, Any]:
    """A review of a pod that asks for the sidecar, with the given (odd) spec."""
    pod = {"metadata": {"annotations": {"sidecar.dotmac.io/inject": "true"}}, "spec": spec}
    return {
        "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"kind": "Pod"}, "object": pod},
    }


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "x",
        {"kind": "AdmissionReview"},
        {"kind": "AdmissionReview", "request": {"uid": 5}},
        {
            "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"kind": "Pod"}, "object": "no"},
        },
        annotated_pod_review({"containers": [None, 3]}),
        annotated_pod_review({"containers": [{"name": "a", "ports": "x", "readinessProbe": 1}]}),
    ],
)
def test_malformed_reviews_are_answered_never_crash(body: Any) -> None:
    defaults, _ = chart_defaults()
    response = review(body, defaults)
    assert response["kind"] == "AdmissionReview"
    assert isinstance(response["response"]["allowed"], bool)
    if not response["response"]["allowed"]:
        assert response["response"]["status"]["message"].startswith("dotmac-sidecar injection")


def test_template_and_webhook_injection_give_the_same_pod(tmp_path: Path) -> None:
    # the static example chart, with the sidecar chart vendored as `helm dependency build` does
    app_chart = tmp_path / "orders"
    shutil.copytree(ROOT / "deploy/example-static", app_chart)
    (app_chart / "charts").mkdir()
    helm.package(str(CHART), destination=str(app_chart / "charts"))
    docs = render(app_chart, {}, name="orders", namespace="orders")
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE, strict=True)
    assert not by_kind(docs, "MutatingWebhookConfiguration")  # no webhook for this way
    static_pod = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "orders")[
        "spec"
    ]["template"]
    names = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    assert {"orders-policy", "orders-sidecar"} <= names

    # the webhook example's pod, injected by the webhook with the chart's default values
    defaults, _ = chart_defaults()
    pod = webhook_example_pod()
    injected = apply(pod, review(admission(pod), defaults))
    assert injected["spec"] == static_pod["spec"]
    assert injected["metadata"]["labels"] == static_pod["metadata"]["labels"]


# ------------------------------------------------------------------------------------------
# the webhook as a process, over real TLS


def make_tls(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "injector.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def webhook_argv(cert: Path, key: Path, *extra: str) -> list[str]:
    """The command line of `dotmac-sidecar inject-webhook` with a certificate and key."""
    return [
        sys.executable,
        "-m",
        "sidecar",
        "inject-webhook",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        *extra,
    ]


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext]]:
    cert, key = make_tls(tmp_path)
    docs = render(CHART, {})
    config = next(d for d in by_kind(docs, "ConfigMap") if "injector.yaml" in d["data"])
    (tmp_path / "injector.yaml").write_text(config["data"]["injector.yaml"])
    port = free_port()
    log = (tmp_path / "webhook.log").open("wb")
    proc = subprocess.Popen(
        webhook_argv(
            cert, key, "--listen", f"127.0.0.1:{port}", "--config", str(tmp_path / "injector.yaml")
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://localhost:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", context=context, timeout=1):
                break
        except OSError:
            assert proc.poll() is None, (tmp_path / "webhook.log").read_text()
            assert time.monotonic() < deadline, "webhook did not start"
            time.sleep(0.05)
    yield url, context
    proc.terminate()
    assert proc.wait(15) == 0
    log.close()


def post(url: str, context: ssl.SSLContext, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/mutate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, context=context, timeout=5) as r:
        assert r.status == 200
        result: dict[str, Any] = json.loads(r.read())
        return result


def test_webhook_process_over_tls(webhook: tuple[str, ssl.SSLContext]) -> None:
    url, context = webhook
    pod = webhook_example_pod()
    response = post(url, context, json.dumps(admission(pod)).encode())
    injected = apply(pod, response)
    kubernetes_validate.validate(injected, KUBE, strict=True)
    assert injected["spec"]["initContainers"][0]["name"] == "dotmac-sidecar"
    bad = post(url, context, b"{not json")
    assert bad["response"]["allowed"] is False
    pod["metadata"]["annotations"]["sidecar.dotmac.io/upstream-port"] = "-1"
    refused = post(url, context, json.dumps(admission(pod)).encode())
    assert "upstream-port must be a port number" in refused["response"]["status"]["message"]


def test_inject_webhook_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run(
        webhook_argv(tmp_path / "no.crt", tmp_path / "no.key"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("dotmac-sidecar: cannot load the TLS certificate")
    assert "Traceback" not in done.stderr
    (tmp_path / "bad.yaml").write_text("sidecar: {listenPort: 'x'}\n")
    cert, key = make_tls(tmp_path)
    done = subprocess.run(
        webhook_argv(cert, key, "--config", str(tmp_path / "bad.yaml")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "'listenPort' must be a int" in done.stderr


def test_dockerfile_is_multi_stage_pinned_non_root_with_the_run_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    base = next(line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert base.split("=", 1)[1].startswith("python:3.11.") and "slim" in base
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    final = text.rsplit("\n" + stages[1] + "\n", 1)[1]
    assert "pip install" not in final and "apt-get" not in final and "gcc" not in final
    assert "COPY --from=build /opt/dotmac /opt/dotmac" in final
    assert "USER 10001:10001" in final
    assert 'ENTRYPOINT ["dotmac-sidecar", "run"]' in final
    assert "pip install ." in text  # the README's way
    # the injected container runs as the image's user
    defaults, _ = chart_defaults()
    assert defaults.run_as_user == 10001
