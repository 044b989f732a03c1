"""deploy/ and docs/cluster.md: every file parses, every command they run is a valid command line.

Each YAML file under deploy/ is read with ``yaml.safe_load_all``. Every ``mtkd`` command line they
run (the RayJob entrypoint, the launcher's commands, the Dockerfile's RUN lines, container
commands, usage lines in comments, the code blocks of docs/cluster.md) goes through the real
parser (``services.cli.build_parser``) and, for ``distill`` and ``train-teacher``, through
``mtkd.config.load_config`` with its overrides, so that an unknown key or a bad value fails. ``ray
job submit`` and ``ray start`` lines go through Ray's own click commands, the launcher config
through Ray's own schema. Then the structural facts: head with no CPUs, a CPU learner group, a
GPU teacher group advertising ``teacher_node``, one shared volume everywhere, the image's pins
equal to pyproject's, a Redis cache that asks for a password which every Ray node has in its
environment (``MTKD_REDIS_PASSWORD``, read by mtkd) and which no config, command line or runtime
environment holds. The last tests feed broken copies to the same checks, to show they fail.

Files are only read: no Docker, no Kubernetes, no network, no Ray started.
"""
from __future__ import annotations

import copy
import io
import json
import re
import shlex
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

pytest.importorskip("ray", reason="the deploy checks use Ray's own parsers (pip install '.[service]')")

from mtkd.config import ConfigError, ExperimentConfig, TeacherTrainConfig, load_config
from mtkd.data import DATASETS
from mtkd.distill.strategies import STRATEGIES
from mtkd.models import MODELS
from mtkd.registry import UnknownNameError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs" / "cluster.md"
KUBERAY = DEPLOY / "kuberay"
CLUSTER_CONFIG = DEPLOY / "configs" / "mtkd_rl-cifar100-cluster.yaml"
REHEARSAL_CONFIG = DEPLOY / "configs" / "mtkd_rl-fashion_mnist-rehearsal.yaml"
SHARED = "/mnt/mtkd"              # the shared storage, mounted at the same path on every node
GCS_PORT = 6379                   # a Ray head's GCS: never the cache's port
PASSWORD_VAR = "MTKD_REDIS_PASSWORD"  # the Redis password, in the environment of every Ray process

YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))
LAUNCHER_COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                         "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")

# Field names of KubeRay's ray.io/v1 types (RayJobSpec, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec), to catch a misspelt field that the API server would silently drop.
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
                    "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC_KEYS = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "conda", "config"}


class BadCommand(AssertionError):
    """A command line in deploy/ or docs/cluster.md is not valid."""


# ----------------------------------------------------------------------------- reading files
def yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_object(path: Path, kind: str) -> dict:
    found = [doc for doc in yaml_docs(path) if isinstance(doc, dict) and doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def launcher() -> dict:
    return yaml_docs(DEPLOY / "cluster.yaml")[0]


def raycluster() -> dict:
    return k8s_object(KUBERAY / "raycluster.yaml", "RayCluster")


def rayjob() -> dict:
    return k8s_object(KUBERAY / "rayjob.yaml", "RayJob")


def pyproject_pin(name: str) -> str:
    """The exact version pyproject.toml pins ``name`` (or ``name[extras]``) to."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.+]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}==...")


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        instruction, _, rest = buffer.partition(" ")
        out.append((instruction.upper(), rest.strip()))
        buffer = ""
    return out


def dockerfile_facts() -> dict:
    instructions = dockerfile_instructions()
    args, base, workdir, copies, runs = {}, None, None, [], []
    for instruction, rest in instructions:
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
        elif instruction == "WORKDIR":
            workdir = rest
        elif instruction == "COPY":
            copies.append([word for word in rest.split() if not word.startswith("--")])
        elif instruction == "RUN":
            runs.append(rest)
    return {"base": base, "workdir": workdir, "copies": copies, "runs": runs, "args": args}


def image_repo() -> str:
    """Where the Dockerfile puts the repository in the image (COPY . <dir>, WORKDIR <dir>)."""
    facts = dockerfile_facts()
    return next(dst for *sources, dst in facts["copies"] if sources == ["."])


# ----------------------------------------------------------------------------- command lines
SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTION = re.compile(r"^\d*(>>?|<)(&\d+)?$")


def shell_segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at && || ; |, redirections removed."""
    segments, current, skip_next = [], [], False
    for token in shlex.split(line, comments=True):
        if skip_next:
            skip_next = False
            continue
        trailing_semicolon = token.endswith(";") and token not in SEPARATORS
        token = token[:-1] if trailing_semicolon else token
        if token in SEPARATORS:
            segments.append(current)
            current = []
        elif REDIRECTION.match(token):
            skip_next = not re.search(r"&\d+$", token)  # `> /dev/null` takes a target; `2>&1` does not
        elif re.match(r"^\d*>>?\S", token):
            pass                                         # `>/dev/null`, target attached
        elif token:
            current.append(token)
        if trailing_semicolon:
            segments.append(current)
            current = []
    segments.append(current)
    return [s for s in segments if s]


@dataclass
class MtkdCommand:
    where: str
    argv: list[str]             # the words after `mtkd`
    relative_paths: bool        # whether relative paths resolve against the repository (a working_dir)
    strict: bool = True         # a command meant to run, not a mention in prose
    error: str | None = None    # the line could not even be read as a command (reported by the test)


def submit_context(words: list[str]) -> dict:
    """Parse `ray job submit` options with Ray's own click command; the entrypoint and its working dir."""
    from ray.dashboard.modules.job.cli import submit

    try:
        params = submit.make_context("submit", list(words)).params
    except Exception as exc:  # click's usage errors
        raise BadCommand(f"ray job submit {shlex.join(words)}: {exc}") from None
    relative = params["working_dir"] is not None
    if params["runtime_env"]:
        path = REPO / params["runtime_env"]
        if not path.is_file():
            raise BadCommand(f"ray job submit: --runtime-env {params['runtime_env']} is not a file of the repository")
        relative = relative or "working_dir" in (yaml.safe_load(path.read_text()) or {})
    return {"entrypoint": list(params["entrypoint"]), "relative_paths": relative, "params": params}


def mtkd_commands_in_line(line: str, where: str, *, relative_paths: bool = True,
                          strict: bool = True) -> list[MtkdCommand]:
    """Every `mtkd ...` a shell line runs: directly, after `--` (ray job submit, kubectl exec), or
    inside `ray exec CONFIG '...'`."""
    found = []
    for segment in shell_segments(line):
        if segment[0] == "mtkd":
            found.append(MtkdCommand(where, segment[1:], relative_paths, strict))
        elif segment[:3] == ["ray", "job", "submit"]:
            context = submit_context(segment[3:])
            entrypoint = context["entrypoint"]
            if entrypoint[:1] != ["mtkd"]:
                raise BadCommand(f"{where}: ray job submit runs {shlex.join(entrypoint)!r}, not an mtkd command")
            found.append(MtkdCommand(where, entrypoint[1:], context["relative_paths"], strict))
        elif segment[:2] == ["ray", "exec"] and len(segment) >= 4:
            found += mtkd_commands_in_line(segment[3], where, relative_paths=True, strict=strict)
        elif "--" in segment:
            rest = segment[segment.index("--") + 1:]
            if rest[:1] == ["mtkd"]:
                found.append(MtkdCommand(where, rest[1:], relative_paths, strict))
    return found


def resolve_config(path: str, relative_paths: bool) -> Path:
    """A --config path as the job sees it, mapped to this checkout."""
    inside = image_repo().rstrip("/") + "/"
    if path.startswith(inside):
        resolved = REPO / path[len(inside):]
    elif Path(path).is_absolute():
        raise BadCommand(f"--config {path}: neither in the repository nor in the image ({inside})")
    elif not relative_paths:
        raise BadCommand(f"--config {path}: a relative path, but this job has no working_dir (use {inside}...)")
    else:
        resolved = REPO / path
    if not resolved.is_file():
        raise BadCommand(f"--config {path}: no such file in the repository ({resolved.relative_to(REPO)})")
    return resolved


def check_mtkd(command: MtkdCommand):
    """Parse with the real `mtkd` parser; load distill/train-teacher configs with their overrides."""
    from services.cli import build_parser

    argv = command.argv
    errors = io.StringIO()
    try:
        with redirect_stderr(errors), redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return None
        raise BadCommand(f"{command.where}: mtkd {shlex.join(argv)}: {errors.getvalue().strip()}") from None
    try:
        overrides = list(getattr(args, "overrides", None) or [])
        if args.command == "distill":
            if getattr(args, "runtime", None):
                overrides.append(f"runtime.runtime={args.runtime}")
            if getattr(args, "address", None):
                overrides.append(f"runtime.address={args.address}")
            if getattr(args, "resume", None):
                if args.config:
                    raise BadCommand("--resume takes the run's saved config; --config is refused")
                if not Path(args.resume).is_absolute():
                    raise BadCommand(f"--resume {args.resume}: a run folder on a cluster is an absolute path")
                return args
            if not args.config:
                if command.strict:
                    raise BadCommand("distill without --config or --resume")
                return args
            config = load_config(ExperimentConfig, resolve_config(args.config, command.relative_paths), overrides)
            MODELS.get(config.student)
            DATASETS.get(config.data.name)
            STRATEGIES.get(config.distill.strategy)
        elif args.command == "train-teacher":
            if not args.config and command.strict:
                raise BadCommand("train-teacher without --config")
            path = resolve_config(args.config, command.relative_paths) if args.config else None
            config = load_config(TeacherTrainConfig, path, overrides)
            MODELS.get(config.model)
            DATASETS.get(config.data.name)
    except (ConfigError, UnknownNameError) as exc:
        raise BadCommand(f"{command.where}: mtkd {shlex.join(argv)}: {exc}") from None
    except BadCommand as exc:
        raise BadCommand(f"{command.where}: mtkd {shlex.join(argv)}: {exc}") from None
    return args


def comment_lines(path: Path) -> list[str]:
    """Comment text of a YAML file or Dockerfile, continuation lines (ending in \\) joined."""
    lines, buffer = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if "#" not in stripped:
            buffer = ""
            continue
        text = stripped.split("#", 1)[1].strip() if not stripped.startswith("#") else stripped.lstrip("#").strip()
        if text.endswith("\\"):
            buffer += text[:-1] + " "
            continue
        lines.append(buffer + text)
        buffer = ""
    return lines


def doc_code_lines() -> list[str]:
    """Shell lines of docs/cluster.md's fenced code blocks (continuations joined)."""
    lines = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", DOCS.read_text(), flags=re.S):
        if language not in ("bash", "sh", "shell", ""):  # ```text blocks are not commands
            continue
        buffer = ""
        for raw in body.splitlines():
            if raw.rstrip().endswith("\\"):
                buffer += raw.rstrip()[:-1] + " "
                continue
            line = (buffer + raw).strip()
            buffer = ""
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def doc_inline_code() -> list[str]:
    text = re.sub(r"```.*?```", "", DOCS.read_text(), flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def k8s_container_commands(path: Path) -> list[str]:
    out = []
    for doc in yaml_docs(path):
        for container in _containers(doc):
            words = [*container.get("command", []), *container.get("args", [])]
            if words:
                out.append(shlex.join(str(w) for w in words))
    return out


def _containers(node) -> list[dict]:
    if isinstance(node, dict):
        found = list(node.get("containers", [])) if isinstance(node.get("containers"), list) else []
        return found + [c for key, value in node.items() if key != "containers" for c in _containers(value)]
    if isinstance(node, list):
        return [c for item in node for c in _containers(item)]
    return []


def all_mtkd_commands() -> list[MtkdCommand]:
    """Every mtkd command line in deploy/ and docs/cluster.md. A line that cannot be read (a broken
    `ray job submit`, unbalanced quotes in a code block) becomes an entry whose test fails."""
    commands: list[MtkdCommand] = []

    def scan(line: str, where: str, **kwargs) -> list[MtkdCommand]:
        try:
            return mtkd_commands_in_line(line, where, **kwargs)
        except (BadCommand, ValueError) as exc:
            return [MtkdCommand(where, [], True, error=f"{line!r}: {exc}")]

    # The RayJob's entrypoint: no working_dir unless its runtime env has one.
    job = rayjob()["spec"]
    runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}") or {}
    commands += scan(job["entrypoint"], "rayjob.yaml entrypoint", relative_paths="working_dir" in runtime_env)
    # The launcher's commands.
    config = launcher()
    for key in LAUNCHER_COMMAND_KEYS:
        for line in config.get(key, []):
            commands += scan(line, f"cluster.yaml {key}")
    # The Dockerfile's RUN lines (run in WORKDIR, the repository).
    for line in dockerfile_facts()["runs"]:
        commands += scan(line, "Dockerfile RUN")
    # Container commands of every Kubernetes object.
    for path in KUBERAY.glob("*.yaml"):
        for line in k8s_container_commands(path):
            commands += scan(line, f"{path.name} container")
    # Usage lines in comments (prose that shlex cannot split, an apostrophe say, is not a command).
    for path in [*YAML_FILES, DEPLOY / "Dockerfile"]:
        for line in comment_lines(path):
            try:
                shlex.split(line)
            except ValueError:
                continue
            commands += scan(line, f"{path.relative_to(REPO)} comment", relative_paths=path.parent != KUBERAY)
    # docs/cluster.md: code blocks run as written; inline code spans are mentions.
    for line in doc_code_lines():
        commands += scan(line, "docs/cluster.md")
    for span in doc_inline_code():
        if span.startswith("mtkd "):
            commands += scan(span, "docs/cluster.md (inline)", strict=False)
    return commands


# ----------------------------------------------------------------------------- placement
def teacher_demand(config: ExperimentConfig) -> dict:
    """What all teacher replicas ask for together, and the largest single replica."""
    total = {"CPU": 0.0, "GPU": 0.0}
    largest = {"CPU": 0.0, "GPU": 0.0}
    for teacher in config.teachers:
        one = {"CPU": teacher.num_cpus if teacher.num_cpus is not None else config.runtime.teacher_num_cpus,
               "GPU": teacher.num_gpus if teacher.num_gpus is not None else config.runtime.teacher_num_gpus,
               **teacher.resources}
        for key, value in one.items():
            total[key] = total.get(key, 0.0) + teacher.replicas * value
            largest[key] = max(largest.get(key, 0.0), value)
    return {"total": total, "largest": largest}


def kuberay_group_resources(group: dict) -> dict:
    """What a KubeRay pod of this group advertises to Ray: rayStartParams, else container limits."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    advertised = {"CPU": float(params.get("num-cpus", _cpu_quantity(limits.get("cpu", "0")))),
                  "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    if "resources" in params:
        # KubeRay's form: a JSON string holding the JSON object, e.g. '"{\"teacher_node\": 4}"'.
        custom = json.loads(params["resources"])
        advertised.update(json.loads(custom) if isinstance(custom, str) else custom)
    return advertised


def _cpu_quantity(value) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def fits(demand: dict, node: dict) -> list[str]:
    return [f"{key}: {need} > {node.get(key, 0)}" for key, need in demand.items() if need > node.get(key, 0) + 1e-9]


def cluster_spec_problems(spec: dict, experiment: ExperimentConfig) -> list[str]:
    """The RayCluster spec against the experiment it runs: groups, placement, storage, versions."""
    problems = []
    problems += [f"spec.{k}: not a RayClusterSpec field" for k in set(spec) - RAYCLUSTER_SPEC_KEYS]
    head = spec["headGroupSpec"]
    problems += [f"headGroupSpec.{k}: not a field" for k in set(head) - HEAD_GROUP_KEYS]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("the head must not take training work: rayStartParams num-cpus: \"0\"")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append("the head service must stay private (ClusterIP)")
    if spec.get("rayVersion") != pyproject_pin("ray"):
        problems.append(f"rayVersion {spec.get('rayVersion')} != pyproject's ray {pyproject_pin('ray')}")
    if (spec.get("authOptions") or {}).get("mode", "token") != "token":
        problems.append("authOptions.mode should be token")
    groups = {g.get("groupName"): g for g in spec.get("workerGroupSpecs", [])}
    for name, group in groups.items():
        problems += [f"{name}.{k}: not a WorkerGroupSpec field" for k in set(group) - WORKER_GROUP_KEYS]
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            if key not in group:
                problems.append(f"worker group {name}: {key} is required")
    advertised = {name: kuberay_group_resources(g) for name, g in groups.items() if "template" in g}
    teacher_groups = [n for n, r in advertised.items() if r.get("teacher_node", 0) > 0]
    learner_groups = [n for n, r in advertised.items() if r.get("teacher_node", 0) == 0 and r["GPU"] == 0]
    if not teacher_groups:
        problems.append("no worker group advertises teacher_node")
    if not learner_groups:
        problems.append("no CPU worker group for the learners")
    demand = teacher_demand(experiment)
    for name in teacher_groups:
        node = advertised[name]
        if node["GPU"] <= 0:
            problems.append(f"teacher group {name} has no GPU")
        problems += [f"a teacher replica does not fit a {name} pod: {p}" for p in fits(demand["largest"], node)]
        capacity = {k: v * groups[name]["maxReplicas"] for k, v in node.items()}
        problems += [f"the teachers do not fit {name} x maxReplicas: {p}" for p in fits(demand["total"], capacity)]
    learner = {"CPU": experiment.runtime.learner_num_cpus, **experiment.runtime.learner_resources}
    placeable = [n for n in learner_groups if not fits(learner, advertised[n])]
    if not placeable:
        problems.append(f"no CPU worker group can hold a learner asking for {learner}")
    elif sum(groups[n]["maxReplicas"] for n in placeable) < experiment.runtime.num_learners:
        problems.append("fewer learner pods (maxReplicas) than runtime.num_learners")
    # The shared volume, at the same path in every pod.
    for name, template in [("head", head["template"]), *[(n, g["template"]) for n, g in groups.items()]]:
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        if claims.get(mounts.get(SHARED)) != shared_claim_name():
            problems.append(f"{name}: the PVC {shared_claim_name()} is not mounted at {SHARED}")
        # The Redis password, for Ray and so for mtkd in the pod (driver, teachers, learners).
        if secret_ref(pod["containers"][0], PASSWORD_VAR) != redis_secret():
            problems.append(f"{name}: {PASSWORD_VAR} does not come from the Redis's Secret {redis_secret()}")
    return problems


def secret_ref(container: dict, name: str) -> dict | None:
    """The ``secretKeyRef`` of the environment variable ``name`` of ``container``, if any."""
    for variable in container.get("env", []):
        if variable.get("name") == name:
            return (variable.get("valueFrom") or {}).get("secretKeyRef")
    return None


def redis_secret() -> dict | None:
    """The Secret (name, key) that the Redis of deploy/kuberay/redis.yaml takes its password from."""
    (container,) = k8s_object(KUBERAY / "redis.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    return secret_ref(container, PASSWORD_VAR)


def shared_claim_name() -> str:
    return k8s_object(KUBERAY / "storage.yaml", "PersistentVolumeClaim")["metadata"]["name"]


def launcher_problems(config: dict, experiment: ExperimentConfig) -> list[str]:
    """The `ray up` config: Ray's own schema, then head / learner / teacher node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError
        return [f"Ray's launcher schema: {str(exc).splitlines()[0]}"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        problems.append("the head node type must advertise CPU: 0 (no training work on the head)")
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    teachers = {n: t for n, t in workers.items() if t.get("resources", {}).get("teacher_node", 0) > 0}
    learners = {n: t for n, t in workers.items() if n not in teachers}
    gpu_instance = re.compile(r"^(g|p)\d")  # AWS's GPU families: g4dn, g5, g6, p4d, p5...
    if config["provider"]["type"] != "aws":
        problems.append("the instance-type checks below are written for AWS")
    if not teachers:
        problems.append("no worker node type advertises teacher_node")
    for name, node in teachers.items():
        if not gpu_instance.match(node["node_config"]["InstanceType"]):
            problems.append(f"teacher node type {name} is not a GPU instance")
        per_replica = teacher_demand(experiment)["largest"].get("teacher_node", 0)
        if node["resources"]["teacher_node"] < per_replica:
            problems.append(f"{name}: teacher_node {node['resources']['teacher_node']} < {per_replica} per replica")
    cpu_learners = [n for n, t in learners.items() if not gpu_instance.match(t["node_config"]["InstanceType"])
                    and all(t.get("resources", {}).get(k, 0) >= v
                            for k, v in experiment.runtime.learner_resources.items())]
    if not cpu_learners:
        problems.append(f"no CPU worker node type offers the learners' resources "
                        f"{experiment.runtime.learner_resources}")
    # Shared storage at the same path on the host and in the container; token auth on.
    run_options = " ".join(config.get("docker", {}).get("run_options", []))
    if f"-v {SHARED}:{SHARED}" not in run_options:
        problems.append(f"docker.run_options must mount {SHARED} at the same path")
    if not any(SHARED in line and "mount" in line for line in config.get("initialization_commands", [])):
        problems.append(f"no initialization command mounts the shared storage at {SHARED}")
    token_mounted = any(path.endswith("auth_token") for path in config.get("file_mounts", {}))
    if "RAY_AUTH_MODE=token" not in run_options or not token_mounted:
        problems.append("token authentication: RAY_AUTH_MODE=token and the token in file_mounts")
    # The cache: redis-server on the head at the port of the experiment's cache.url.
    url = urlparse(experiment.cache.url or "")
    starts = " ".join(config.get("head_start_ray_commands", []))
    if f"redis-server --port {url.port}" not in starts or "allkeys-lru" not in starts or url.port == GCS_PORT:
        problems.append(f"the head must start redis-server on the cache's port {url.port} (not {GCS_PORT}), "
                        f"with allkeys-lru")
    for key in ("head_setup_commands", "worker_setup_commands"):
        if not any(f" {url.hostname}" in line and "/etc/hosts" in line for line in config.get(key, [])):
            problems.append(f"{key}: nothing maps the cache host {url.hostname} to the head")
    # The cache asks for a password, read from a file that file_mounts puts on the head.
    password_file = next((path for path in config.get("file_mounts", {}) if path.endswith("redis_password")), None)
    if password_file is None or password_file not in starts or "--requirepass" not in starts:
        problems.append("the head's redis-server must ask for a password (--requirepass) read from a file in "
                        "file_mounts")
    if "--protected-mode no" in starts:
        problems.append("redis-server: leave protected mode on")
    # Every Ray process, on the head and the workers, inherits the password from `ray start`'s shell.
    export = ["export", f"{PASSWORD_VAR}=$(cat {password_file})"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        lines = [shell_segments(line) for line in config.get(key, [])]
        ray_starts = [line for line in lines if ["ray", "start"] in [s[:2] for s in line]]
        if not ray_starts or any(export not in line[:[s[:2] for s in line].index(["ray", "start"])]
                                 for line in ray_starts):
            problems.append(f"{key}: `ray start` without {PASSWORD_VAR} exported from the password file first")
    return problems


# ============================================================================= tests
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_deploy_yaml_parses(path):
    docs = yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    if path.parent == KUBERAY:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"


def test_expected_files_exist():
    for name in ("cluster.yaml", "runtime_env.yaml", "Dockerfile", "Dockerfile.dockerignore",
                 "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/storage.yaml", "kuberay/redis.yaml"):
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"
    assert CLUSTER_CONFIG.is_file() and REHEARSAL_CONFIG.is_file() and DOCS.is_file()


ALL_COMMANDS = all_mtkd_commands()


def _command_id(command: MtkdCommand) -> str:
    return f"{command.where}: {'unreadable' if command.error else 'mtkd ' + ' '.join(command.argv)}"[:150]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=_command_id)
def test_every_mtkd_command_is_valid(command):
    if command.error:
        raise BadCommand(f"{command.where}: {command.error}")
    check_mtkd(command)


def test_commands_were_found_everywhere():
    wheres = {c.where.split(" ")[0] for c in ALL_COMMANDS}
    assert {"rayjob.yaml", "cluster.yaml", "Dockerfile", "docs/cluster.md"} <= wheres, wheres
    entry = [c for c in ALL_COMMANDS if c.where == "rayjob.yaml entrypoint"]
    assert len(entry) == 1 and entry[0].argv[0] == "distill" and "--config" in entry[0].argv
    docs = [c.argv for c in ALL_COMMANDS if c.where == "docs/cluster.md"]
    assert any(a[:1] == ["distill"] and "--resume" in a for a in docs), "docs: no `mtkd distill --resume`"
    assert any(a[:1] == ["distill"] and any(o.startswith("teachers.0.replicas=") for o in a) for a in docs)


def test_experiment_configs_load_with_absolute_shared_paths():
    paths = sorted((DEPLOY / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        if path.name.startswith("teacher-"):
            config = load_config(TeacherTrainConfig, path)
            MODELS.get(config.model)
            locations = [config.output_dir, config.data.root]
        else:
            config = load_config(ExperimentConfig, path)
            MODELS.get(config.student)
            STRATEGIES.get(config.distill.strategy)
            locations = [config.output_dir, config.data.root, config.runtime.storage_path,
                         *[t.checkpoint for t in config.teachers]]
            assert config.teachers and all(t.resources.get("teacher_node", 0) > 0 for t in config.teachers), path
            url = urlparse(config.cache.url or "")
            assert url.scheme == "redis" and url.port and url.port != GCS_PORT, f"{path}: cache.url {config.cache.url}"
        DATASETS.get(config.data.name)
        for location in locations:
            assert location and (Path(location).is_absolute() or "://" in location), \
                f"{path.name}: {location!r} must be absolute (the job runs in a temporary copy of the code)"


def test_cluster_experiment_config():
    config = load_config(ExperimentConfig, CLUSTER_CONFIG)
    for location in [config.output_dir, config.data.root, config.runtime.storage_path,
                     *[t.checkpoint for t in config.teachers]]:
        assert location.startswith(SHARED + "/"), f"{location} is not on the shared storage {SHARED}"
    assert all((t.num_gpus or 0) > 0 for t in config.teachers), "teachers run on the GPU nodes"
    assert config.runtime.device == "cpu" and config.runtime.max_failures != 0
    assert config.runtime.learner_resources and config.runtime.address is None


def test_launcher_config():
    problems = launcher_problems(launcher(), load_config(ExperimentConfig, CLUSTER_CONFIG))
    assert problems == []


def test_ray_start_commands_parse():
    from ray.scripts.scripts import start

    lines = [line for key in LAUNCHER_COMMAND_KEYS for line in launcher().get(key, [])] + doc_code_lines()
    starts = [s[2:] for line in lines for s in shell_segments(line) if s[:2] == ["ray", "start"]]
    assert len(starts) >= 3
    for words in starts:
        params = start.make_context("start", list(words)).params
        json.loads(params["resources"])


def test_rehearsal_fits_the_documented_head():
    from ray.scripts.scripts import start

    heads = [s[2:] for line in doc_code_lines() for s in shell_segments(line)
             if s[:2] == ["ray", "start"] and "--head" in s]
    assert len(heads) == 1, "docs/cluster.md: one local `ray start --head` for the rehearsal"
    params = start.make_context("start", heads[0]).params
    assert params["dashboard_host"] == "127.0.0.1", "the rehearsal's dashboard stays on loopback"
    node = {"CPU": params["num_cpus"], "GPU": params["num_gpus"] or 0, **json.loads(params["resources"])}
    config = load_config(ExperimentConfig, REHEARSAL_CONFIG)
    demand = teacher_demand(config)["total"]
    demand["CPU"] += config.runtime.num_learners * config.runtime.learner_num_cpus
    for key, value in config.runtime.learner_resources.items():
        demand[key] = demand.get(key, 0) + config.runtime.num_learners * value
    assert fits(demand, node) == []
    text = DOCS.read_text()
    assert "RAY_AUTH_MODE=disabled" in text and "ray stop" in text
    assert f"--config {REHEARSAL_CONFIG.relative_to(REPO)}" in text


def test_kuberay_raycluster_and_rayjob():
    experiment = load_config(ExperimentConfig, CLUSTER_CONFIG)
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster_spec_problems(cluster["spec"], experiment) == []
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, set(spec) - RAYJOB_SPEC_KEYS
    assert spec["rayClusterSpec"] == cluster["spec"], "the RayJob's cluster differs from raycluster.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)
    # The entrypoint's config is the one the cluster's groups were sized for.
    entry = mtkd_commands_in_line(spec["entrypoint"], "rayjob", relative_paths="working_dir" in runtime_env)
    args = check_mtkd(entry[0])
    assert resolve_config(args.config, False) == CLUSTER_CONFIG


def test_kuberay_storage_and_redis():
    claim = k8s_object(KUBERAY / "storage.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    url = urlparse(load_config(ExperimentConfig, CLUSTER_CONFIG).cache.url)
    service = k8s_object(KUBERAY / "redis.yaml", "Service")
    assert service["metadata"]["name"] == url.hostname
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert url.port in ports and GCS_PORT not in ports
    deployment = k8s_object(KUBERAY / "redis.yaml", "Deployment")
    words = [str(w) for c in deployment["spec"]["template"]["spec"]["containers"]
             for w in [*c.get("command", []), *c.get("args", [])]]
    assert words[words.index("--maxmemory") + 1] and words[words.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert words[words.index("--port") + 1] == str(url.port)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # A password from a Secret: Kubernetes expands $(VAR) in args from the container's env.
    assert words[words.index("--requirepass") + 1] == f"$({PASSWORD_VAR})" and "--protected-mode" not in words
    secret = redis_secret()
    assert secret and secret.get("name") and secret.get("key"), f"redis.yaml: {PASSWORD_VAR} not from a Secret"
    # The Ray pods (head, learners, teachers) have it too: cluster_spec_problems, above.


def test_no_config_or_command_line_carries_the_redis_password():
    """mtkd reads the password from MTKD_REDIS_PASSWORD in each process, so it never has to be in a
    config (saved to the run folder), a command line or a job entrypoint (shown by `ray job list`
    and the dashboard), or a runtime environment's env_vars (shown in the dashboard)."""
    for path in sorted((DEPLOY / "configs").glob("*.yaml")):
        url = (yaml.safe_load(path.read_text()).get("cache") or {}).get("url")
        assert url is None or urlparse(url).password is None, f"{path.name}: cache.url holds a password"
    mentions = [c for c in ALL_COMMANDS if not c.error]
    assert {"rayjob.yaml entrypoint", "docs/cluster.md"} <= {c.where for c in mentions}
    for command in mentions:
        line = shlex.join(command.argv)
        assert PASSWORD_VAR not in line and "REDISCLI_AUTH" not in line, f"{command.where}: mtkd {line}"
        for override in command.argv:
            if override.startswith("cache.url="):
                assert urlparse(override.split("=", 1)[1]).password is None, f"{command.where}: mtkd {line}"
    job_env = yaml.safe_load(rayjob()["spec"].get("runtimeEnvYAML") or "{}") or {}
    runtime_env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    for where, env in (("runtime_env.yaml", runtime_env), ("rayjob.yaml", job_env)):
        names = (env or {}).get("env_vars") or {}
        assert not [n for n in names if "PASSWORD" in n.upper() or "AUTH" in n.upper()], f"{where}: env_vars {names}"
    # Nor a URL with a password, nor the variable expanded into a command, anywhere in deploy/ or the docs.
    for path in [*YAML_FILES, DOCS, REPO / "docs" / "distributed.md"]:
        text = path.read_text()
        assert not re.search(r"rediss?://[^/\s@]*:[^/\s@]*@", text), f"{path.name}: a Redis URL with a password"
        assert "${%s}" % PASSWORD_VAR not in text and "$%s@" % PASSWORD_VAR not in text, path.name


def test_one_image_everywhere():
    images = {launcher()["docker"]["image"]}
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "storage.yaml"):
        images |= {c["image"] for doc in yaml_docs(path) for c in _containers(doc)}
    assert len(images) == 1, f"every node and pod should run the same mtkd image: {images}"


def test_dockerfile_matches_pyproject():
    facts = dockerfile_facts()
    official = r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-(gpu|cpu|cu\d+)"
    match = re.fullmatch(official, facts["base"] or "")
    assert match, f"base image {facts['base']!r} is not an official rayproject/ray image"
    assert match["ray"] == pyproject_pin("ray"), f"base image Ray {match['ray']} != pyproject's {pyproject_pin('ray')}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={match['py']}.{match['minor']}" in requires, f"image Python {match['py']}.{match['minor']} vs {requires}"
    runs = " ".join(facts["runs"])
    pins = re.findall(r"torch==([\w.+]+)", runs)
    assert pins == [pyproject_pin("torch")], f"Dockerfile torch pins {pins} != pyproject's {pyproject_pin('torch')}"
    assert re.search(r"pip install[^&]*'\.\[service\]'", runs), "pip install '.[service]'"
    assert facts["workdir"] == image_repo(), "WORKDIR is the repository copied into the image"
    assert not re.search(r"\b(curl|wget)\b", runs), "no downloads in the image build: data comes from mounted storage"
    ignored = {line.strip().rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "cache"} <= ignored


def test_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert set(data) <= RUNTIME_ENV_KEYS, set(data) - RUNTIME_ENV_KEYS
    RuntimeEnv(**data)  # Ray's own type checks (env_vars str -> str, excludes a list...)
    assert data["working_dir"] == "."
    excluded = {e.strip("/") for e in data["excludes"]}
    assert {"runs", "cache", ".venv", ".git"} <= excluded, f"big folders not excluded: {excluded}"


def test_docs_cover_the_steps_and_stay_in_the_repository():
    text = DOCS.read_text()
    code = "\n".join(doc_code_lines())
    for step in ("docker build -f deploy/Dockerfile", "docker push", "ray up", "ray job submit",
                 "--runtime-env deploy/runtime_env.yaml", "ray job logs", "ray down",
                 "kubectl apply -f deploy/kuberay/rayjob.yaml", "kubectl get rayjob", "kubectl logs",
                 "--working-dir .", "ray stop"):
        assert step in code, f"docs/cluster.md: no `{step}` in a code block"
    for heading in ("# Run on a cluster", "Redis", "Rehearse on one machine", "Security"):
        assert heading in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        resolved = (DOCS.parent / target).resolve()
        assert resolved.exists() and REPO in resolved.parents, f"docs/cluster.md links outside the repository: {target}"
    for span in doc_inline_code():
        if re.fullmatch(r"(deploy|configs|docs|tests)/[\w./-]+", span):
            assert (REPO / span).exists(), f"docs/cluster.md names {span}, which does not exist"
    assert "/work/" not in text


# ----------------------------------------------------------------------------- the checks can fail
def _entrypoint() -> MtkdCommand:
    return next(c for c in ALL_COMMANDS if c.where == "rayjob.yaml entrypoint")


@pytest.mark.parametrize("mutate, message", [
    (lambda argv: [*argv, "runtime.num_learner=2"], "unknown key 'runtime.num_learner'"),
    (lambda argv: [*argv, "runtime.device=tpu"], "unknown device"),
    (lambda argv: [*argv, "teachers.7.replicas=2"], "out of range"),
    (lambda argv: [*argv, "student=resnet_8"], "unknown model"),
    (lambda argv: ["distil", *argv[1:]], "invalid choice"),
    (lambda argv: [a.replace("--config", "--confg") for a in argv], "unrecognized arguments"),
    (lambda argv: [a.replace(".yaml", "-missing.yaml") for a in argv], "no such file"),
    (lambda argv: [a.replace(image_repo() + "/", "") for a in argv], "no working_dir"),
    (lambda argv: [*argv, "--resume", "/mnt/mtkd/runs/x"], "--config is refused"),
])
def test_command_check_fails_on_a_broken_entrypoint(mutate, message):
    command = _entrypoint()
    broken = MtkdCommand(command.where, mutate(list(command.argv)), command.relative_paths)
    with pytest.raises(BadCommand, match=re.escape(message)):
        check_mtkd(broken)


def test_command_extraction_fails_on_a_broken_submit_line():
    with pytest.raises(BadCommand, match="No such option"):
        mtkd_commands_in_line("ray job submit --adress http://127.0.0.1:8265 -- mtkd distill --config x", "t")
    with pytest.raises(BadCommand, match="not a file"):
        mtkd_commands_in_line("ray job submit --runtime-env deploy/nope.yaml -- mtkd distill --config x", "t")
    with pytest.raises(BadCommand, match="not an mtkd command"):
        mtkd_commands_in_line("ray job submit -- python train.py", "t")


def _drop_teacher_gpu(spec):
    group = next(g for g in spec["workerGroupSpecs"] if "teacher_node" in g["rayStartParams"].get("resources", ""))
    for section in group["template"]["spec"]["containers"][0]["resources"].values():
        section.pop("nvidia.com/gpu", None)


def _drop_teacher_resource(spec):
    for group in spec["workerGroupSpecs"]:
        group["rayStartParams"].pop("resources", None)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    (_drop_teacher_gpu, "has no GPU"),
    (_drop_teacher_resource, "no worker group advertises teacher_node"),
    (lambda s: s.update(rayVersion="2.9.0"), "rayVersion"),
    (lambda s: s["workerGroupSpecs"][0].update(maxReplica=4), "not a WorkerGroupSpec field"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("volumeMounts"), "is not mounted"),
    (lambda s: s["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0].pop("env"), "MTKD_REDIS_PASSWORD"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
     .update(name="other"), "MTKD_REDIS_PASSWORD"),
])
def test_cluster_spec_check_fails_on_a_broken_spec(mutate, message):
    spec = copy.deepcopy(raycluster()["spec"])
    mutate(spec)
    problems = cluster_spec_problems(spec, load_config(ExperimentConfig, CLUSTER_CONFIG))
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["available_node_types"]["ray.head.default"].update(resources={}), "CPU: 0"),
    (lambda c: c["available_node_types"]["ray.worker.teacher"].update(resources={}), "teacher_node"),
    (lambda c: c["available_node_types"]["ray.worker.teacher"]["node_config"].update(InstanceType="c6i.4xlarge"),
     "not a GPU instance"),
    (lambda c: c.update(setup_command=[]), "schema"),
    (lambda c: c["docker"].update(run_options=[]), f"mount {SHARED}"),
    (lambda c: c.update(head_start_ray_commands=c["head_start_ray_commands"][-1:]), "redis-server"),
    (lambda c: c.update(head_start_ray_commands=[line.replace(' --requirepass "$REDISCLI_AUTH"', "")
                                                 for line in c["head_start_ray_commands"]]), "--requirepass"),
    (lambda c: c.update(head_start_ray_commands=[line.replace("--bind 0.0.0.0", "--bind 0.0.0.0 --protected-mode no")
                                                 for line in c["head_start_ray_commands"]]), "protected mode"),
    (lambda c: c["file_mounts"].pop("/home/ray/.mtkd/redis_password"), "--requirepass"),
    (lambda c: c.update(worker_start_ray_commands=[line.split("; ", 1)[-1] if "ray start" in line else line
                                                   for line in c["worker_start_ray_commands"]]),
     "worker_start_ray_commands: `ray start` without MTKD_REDIS_PASSWORD"),
    (lambda c: c.update(head_start_ray_commands=[line.replace("export MTKD_REDIS_PASSWORD", "MTKD_REDIS_PASSWORD")
                                                 for line in c["head_start_ray_commands"]]),
     "head_start_ray_commands: `ray start` without MTKD_REDIS_PASSWORD"),
])
def test_launcher_check_fails_on_a_broken_config(mutate, message):
    config = copy.deepcopy(launcher())
    mutate(config)
    problems = launcher_problems(config, load_config(ExperimentConfig, CLUSTER_CONFIG))
    assert any(message in p for p in problems), problems
