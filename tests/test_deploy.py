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
environment holds.

Whether it schedules: every field of every Kubernetes object against the ray.io/v1 (KubeRay v1.6.0)
and core/v1 field names; the launcher config against the ray-schema.json of the installed ray
(jsonschema); each pod's requests against the allocatable of every node type docs/cluster.md names
(the cloud's kube-reserved formula, less a headroom); the autoscalers' idle timeouts against the
driver's placement wait; CPU and GPU images; a storage class placeholder and the image's uid/gid;
Ray logs copied to the shared volume; the cluster spec written once (the RayJob selects the
RayCluster, or kustomize copies it); RayJob deadlines. The last tests feed broken copies (each defect
these files once had among them) to the same checks, to show they fail.

Files are only read: no Docker, no Kubernetes cluster, no network, no Ray started (`kubectl
kustomize`, offline, where kubectl is installed).
"""
from __future__ import annotations

import copy
import io
import json
import math
import re
import shlex
import shutil
import subprocess
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
    """The Dockerfile's stages ({name: {"from": image or stage, "runs": [RUN ...]}}, in order), the ARG
    defaults declared before the first FROM, every RUN, WORKDIR and COPY."""
    args, stages, current, workdir, copies, runs = {}, {}, None, None, [], []
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = {"from": words[0], "runs": []}
        elif instruction == "WORKDIR":
            workdir = rest
        elif instruction == "COPY":
            copies.append([word for word in rest.split() if not word.startswith("--")])
        elif instruction == "RUN":
            runs.append(rest)
            current["runs"].append(rest)
    return {"stages": stages, "workdir": workdir, "copies": copies, "runs": runs, "args": args}


def dockerfile_build(flavor: str) -> dict:
    """What `docker build --build-arg FLAVOR=<flavor>` builds: the base image it starts from (stages
    followed back to an image) and the RUN lines of every stage on the way, first to last."""
    facts = dockerfile_facts()
    args = {**facts["args"], "FLAVOR": flavor}
    stage, runs, seen = list(facts["stages"])[-1], [], set()
    while stage in facts["stages"] and stage not in seen:
        seen.add(stage)
        runs = facts["stages"][stage]["runs"] + runs
        stage = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), facts["stages"][stage]["from"])
    return {"base": stage, "runs": runs}


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
    problems += unknown_fields(spec, "RayClusterSpec", "spec")
    head = spec["headGroupSpec"]
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


def launcher_schema() -> dict:
    """Ray's cluster-launcher schema, as the installed ray package ships it."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_schema_problems(config: dict) -> list[str]:
    """Every place where ``config`` breaks Ray's launcher schema (JSON Schema, with jsonschema)."""
    import jsonschema

    schema = launcher_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"Ray's launcher schema: {'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))]


def launcher_problems(config: dict, experiment: ExperimentConfig) -> list[str]:
    """The `ray up` config: Ray's own schema, then head / learner / teacher node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = launcher_schema_problems(config)
    if problems:
        return problems
    try:  # Ray's own checks beyond the schema (node types, worker counts), on the filled-in config
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError
        return [f"Ray's launcher schema: {str(exc).splitlines()[0]}"]
    # Idle nodes are stopped after idle_timeout_minutes (or a type's idle_timeout_s): not while the
    # driver waits for its teachers to be placed.
    wait = placement_timeout_s(experiment)
    if config.get("idle_timeout_minutes", 5) * 60 < wait:
        problems.append(f"idle_timeout_minutes {config.get('idle_timeout_minutes', 5)} < {wait:.0f} s, the "
                        f"driver's wait for teacher placement: idle learner nodes are stopped while it waits")
    for name, node_type in config["available_node_types"].items():
        if node_type.get("idle_timeout_s") is not None and node_type["idle_timeout_s"] < wait:
            problems.append(f"{name}.idle_timeout_s {node_type['idle_timeout_s']} < {wait:.0f} s")
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


# ----------------------------------------------------------------------------- Kubernetes field names
# Every field of the Kubernetes objects in deploy/kuberay/ is checked against these names, so that a
# misspelt field (which the API server drops without a word) fails here. The ray.io/v1 types are those
# of KubeRay v1.6.0 (ray-operator/apis/ray/v1/*_types.go, the oldest operator docs/cluster.md allows);
# the core/v1 types are those the v1.6.0 CRDs embed for pod templates. Only names are kept. A value
# "" is a scalar, "map" a free-form map, "any" a subtree not modelled here, [T] a list of T.
# (generateName: of a top-level object's metadata; the CRDs' pod-template metadata lists the others.)
OBJECT_META = {"name": "", "namespace": "", "generateName": "", "labels": "map", "annotations": "map",
               "finalizers": [""]}
K8S_TYPES: dict[str, dict] = {
    # ray.io/v1
    "RayCluster": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "RayClusterSpec"},
    "RayJob": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "RayJobSpec"},
    "RayJobSpec": {"activeDeadlineSeconds": "", "backoffLimit": "", "rayClusterSpec": "RayClusterSpec",
                   "submitterPodTemplate": "PodTemplateSpec", "metadata": "map", "clusterSelector": "map",
                   "submitterConfig": "SubmitterConfig", "managedBy": "", "deletionStrategy": "DeletionStrategy",
                   "entrypoint": "", "runtimeEnvYAML": "", "jobId": "", "submissionMode": "",
                   "entrypointResources": "", "entrypointNumCpus": "", "entrypointNumGpus": "",
                   "ttlSecondsAfterFinished": "", "preRunningDeadlineSeconds": "", "shutdownAfterJobFinishes": "",
                   "suspend": ""},
    "SubmitterConfig": {"backoffLimit": ""},
    "DeletionStrategy": {"onSuccess": "any", "onFailure": "any", "deletionRules": "any"},
    "RayClusterSpec": {"upgradeStrategy": "any", "authOptions": "AuthOptions", "suspend": "", "managedBy": "",
                       "autoscalerOptions": "AutoscalerOptions", "headServiceAnnotations": "map",
                       "enableInTreeAutoscaling": "", "gcsFaultToleranceOptions": "any",
                       "headGroupSpec": "HeadGroupSpec", "rayVersion": "", "workerGroupSpecs": ["WorkerGroupSpec"]},
    "AuthOptions": {"enableK8sTokenAuth": "", "secretName": "", "mode": ""},
    "AutoscalerOptions": {"resources": "ResourceRequirements", "image": "", "imagePullPolicy": "",
                          "securityContext": "SecurityContext", "idleTimeoutSeconds": "", "upscalingMode": "",
                          "version": "", "env": ["EnvVar"], "envFrom": "any", "volumeMounts": ["VolumeMount"]},
    "HeadGroupSpec": {"template": "PodTemplateSpec", "headService": "any", "enableIngress": "", "resources": "map",
                      "labels": "map", "rayStartParams": "map", "serviceType": ""},
    "WorkerGroupSpec": {"suspend": "", "groupName": "", "replicas": "", "minReplicas": "", "maxReplicas": "",
                        "idleTimeoutSeconds": "", "resources": "map", "labels": "map", "rayStartParams": "map",
                        "template": "PodTemplateSpec", "scaleStrategy": "any", "numOfHosts": ""},
    # core/v1, as embedded in the KubeRay CRDs' pod templates
    "ObjectMeta": OBJECT_META,
    "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    "PodSpec": {name: "any" for name in (
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig", "dnsPolicy",
        "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID",
        "hostUsers", "hostname", "hostnameOverride", "imagePullSecrets", "nodeName", "os", "overhead",
        "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
        "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "serviceAccount", "serviceAccountName",
        "setHostnameAsFQDN", "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds",
        "topologySpreadConstraints", "workloadRef")} | {
        "containers": ["Container"], "initContainers": ["Container"], "nodeSelector": "map",
        "securityContext": "PodSecurityContext", "tolerations": ["Toleration"], "volumes": ["Volume"]},
    "Container": {name: "any" for name in (
        "envFrom", "lifecycle", "livenessProbe", "readinessProbe", "resizePolicy", "startupProbe", "stdin",
        "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
        "workingDir")} | {
        "name": "", "image": "", "imagePullPolicy": "", "command": [""], "args": [""], "env": ["EnvVar"],
        "ports": ["ContainerPort"], "resources": "ResourceRequirements", "restartPolicy": "",
        "restartPolicyRules": "any", "securityContext": "SecurityContext", "volumeMounts": ["VolumeMount"]},
    "EnvVar": {"name": "", "value": "", "valueFrom": "EnvVarSource"},
    "EnvVarSource": {"configMapKeyRef": "any", "fieldRef": "ObjectFieldSelector", "fileKeyRef": "any",
                     "resourceFieldRef": "any",
                     "secretKeyRef": "SecretKeySelector"},
    "ObjectFieldSelector": {"apiVersion": "", "fieldPath": ""},
    "SecretKeySelector": {"key": "", "name": "", "optional": ""},
    "ContainerPort": {"containerPort": "", "hostIP": "", "hostPort": "", "name": "", "protocol": ""},
    "ResourceRequirements": {"claims": "any", "limits": "map", "requests": "map"},
    "VolumeMount": {"mountPath": "", "mountPropagation": "", "name": "", "readOnly": "", "recursiveReadOnly": "",
                    "subPath": "", "subPathExpr": ""},
    "Toleration": {"effect": "", "key": "", "operator": "", "tolerationSeconds": "", "value": ""},
    "PodSecurityContext": {"appArmorProfile": "any", "fsGroup": "", "fsGroupChangePolicy": "", "runAsGroup": "",
                           "runAsNonRoot": "", "runAsUser": "", "seLinuxChangePolicy": "", "seLinuxOptions": "any",
                           "seccompProfile": "any", "supplementalGroups": [""], "supplementalGroupsPolicy": "",
                           "sysctls": "any", "windowsOptions": "any"},
    "SecurityContext": {"allowPrivilegeEscalation": "", "appArmorProfile": "any", "capabilities": "any",
                        "privileged": "", "procMount": "", "readOnlyRootFilesystem": "", "runAsGroup": "",
                        "runAsNonRoot": "", "runAsUser": "", "seLinuxOptions": "any", "seccompProfile": "any",
                        "windowsOptions": "any"},
    "Volume": {name: "any" for name in (
        "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
        "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath",
        "image", "iscsi", "nfs", "photonPersistentDisk", "portworxVolume", "projected", "quobyte", "rbd",
        "scaleIO", "secret", "storageos", "vsphereVolume")} | {
        "name": "", "emptyDir": "EmptyDirVolumeSource", "persistentVolumeClaim": "PVCVolumeSource"},
    "EmptyDirVolumeSource": {"medium": "", "sizeLimit": ""},
    "PVCVolumeSource": {"claimName": "", "readOnly": ""},
    "PersistentVolumeClaimSpec": {"accessModes": [""], "dataSource": "any", "dataSourceRef": "any",
                                  "resources": "ResourceRequirements", "selector": "any", "storageClassName": "",
                                  "volumeAttributesClassName": "", "volumeMode": "", "volumeName": ""},
    # The other objects of deploy/kuberay/: their pod templates and claims use the types above.
    "Pod": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "PodSpec"},
    "PersistentVolumeClaim": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta",
                              "spec": "PersistentVolumeClaimSpec"},
    "Deployment": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "DeploymentSpec"},
    "DeploymentSpec": {"replicas": "", "selector": "any", "template": "PodTemplateSpec", "strategy": "any",
                       "minReadySeconds": "", "revisionHistoryLimit": "", "progressDeadlineSeconds": "",
                       "paused": ""},
    "Service": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "any"},
    "NetworkPolicy": {"apiVersion": "", "kind": "", "metadata": "ObjectMeta", "spec": "any"},
}


def unknown_fields(node, kind, where: str) -> list[str]:
    """Fields of ``node`` that its type ``kind`` (a K8S_TYPES name, "", "map", "any" or [T]) lacks."""
    if isinstance(kind, list):
        if not isinstance(node, list):
            return [f"{where}: a list expected"]
        return [p for i, item in enumerate(node) for p in unknown_fields(item, kind[0], f"{where}[{i}]")]
    if kind in ("", "any", "map"):
        if kind == "map" and not isinstance(node, dict):
            return [f"{where}: a map expected"]
        return []
    if not isinstance(node, dict):
        return [f"{where}: a {kind} object expected"]
    fields = K8S_TYPES[kind]
    problems = [f"{where}.{key}: not a {kind} field" for key in node if key not in fields]
    return problems + [p for key, value in node.items() if key in fields
                       for p in unknown_fields(value, fields[key], f"{where}.{key}")]


def k8s_objects() -> list[tuple[str, dict]]:
    """(file name, object) of every Kubernetes API object in deploy/kuberay/ (kustomizations left out)."""
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml_docs(path)
            if not doc.get("apiVersion", "").startswith("kustomize.config.k8s.io/")]


# ----------------------------------------------------------------------------- node pools, pod sizes
@dataclass(frozen=True)
class NodeType:
    """A node type docs/cluster.md names for a pool (nodes labelled ``mtkd/pool: <pool>``)."""
    pool: str
    cloud: str          # whose kubelet reservations apply: EKS (the EKS-optimized AMIs) or GKE
    name: str
    vcpus: int
    memory_gib: int
    gpus: int = 0
    max_pods: int = 0   # EKS: the AMI's max pods of the instance type (ENIs x (IPs per ENI - 1) + 2)


POOL_LABEL = "mtkd/pool"
NODE_TYPES = [
    NodeType("head", "EKS", "m6i.2xlarge", 8, 32, max_pods=58),
    NodeType("learner", "EKS", "c6i.4xlarge", 16, 32, max_pods=234),
    NodeType("teacher", "EKS", "g5.2xlarge", 8, 32, gpus=1, max_pods=58),
    NodeType("head", "GKE", "n2-standard-8", 8, 32),
    NodeType("learner", "GKE", "c2d-highcpu-16", 16, 32),
    NodeType("teacher", "GKE", "g2-standard-8", 8, 32, gpus=1),
]
EVICTION_MIB = 100          # the kubelet's hard eviction threshold (memory.available) on both clouds
# Headroom left free on every node beyond its allocatable: DaemonSets (kube-proxy, the CNI and CSI
# node plugins, the GPU device plugin, a log or metrics agent) and the kernel's share of the nominal
# memory (the kubelet's capacity is the kernel's MemTotal, a few percent under the instance size).
DAEMONSET_CPU_M, DAEMONSET_MEMORY_MIB, KERNEL_MEMORY_SHARE = 500, 1024, 0.03
# What KubeRay v1.6.0 adds to the pods: the autoscaler container in the head pod (its default
# resources, unless autoscalerOptions.resources), the wait-gcs-ready init container in worker pods,
# and the submitter Job's pod of a RayJob in K8sJobMode (its default template).
KUBERAY_AUTOSCALER = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}
KUBERAY_WAIT_GCS = {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": "200m", "memory": "256Mi"}}
KUBERAY_SUBMITTER = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
KUBERAY_DEFAULT_IDLE_TIMEOUT_S = 60


def _tiered(amount: float, tiers: list[tuple[float, float]]) -> float:
    """Sum of fraction x the part of ``amount`` in each successive tier of (size, fraction)."""
    total, left = 0.0, amount
    for size, fraction in tiers:
        part = min(left, size)
        total, left = total + part * fraction, left - part
    return total


def reserved_cpu_m(node: NodeType) -> float:
    """kube-reserved CPU, the same on EKS AMIs and GKE: 6% of the first core, 1% of the second, 0.5%
    of the next two, 0.25% of every core above four."""
    return _tiered(node.vcpus * 1000, [(1000, 0.06), (1000, 0.01), (2000, 0.005), (math.inf, 0.0025)])


def reserved_memory_mib(node: NodeType) -> float:
    """kube-reserved memory: EKS AMIs 11 MiB per pod of max pods + 255 MiB; GKE 25% of the first 4 GiB,
    20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above 128 GiB."""
    if node.cloud == "EKS":
        return 11 * node.max_pods + 255
    return 1024 * _tiered(node.memory_gib, [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)])


def allocatable(node: NodeType) -> dict:
    """The node's allocatable (capacity - kube-reserved - eviction threshold), from its nominal size."""
    return {"cpu_m": math.floor(node.vcpus * 1000 - reserved_cpu_m(node)),
            "memory_mib": math.floor(node.memory_gib * 1024 - reserved_memory_mib(node) - EVICTION_MIB),
            "gpu": node.gpus}


def usable(node: NodeType) -> dict:
    """Allocatable less the headroom (DaemonSets, the kernel's share): what mtkd's pods may request."""
    free = allocatable(node)
    return {"cpu_m": free["cpu_m"] - DAEMONSET_CPU_M,
            "memory_mib": free["memory_mib"] - DAEMONSET_MEMORY_MIB - KERNEL_MEMORY_SHARE * node.memory_gib * 1024,
            "gpu": free["gpu"]}


UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "25Gi", 4) as a number (cores, bytes, devices)."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in UNITS, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def container_requests(resources: dict) -> dict:
    """A container's requests in (millicores, MiB, GPUs); a resource with a limit and no request
    requests its limit, as the API server defaults it."""
    amounts = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {"cpu_m": quantity(amounts.get("cpu", 0)) * 1000, "memory_mib": quantity(amounts.get("memory", 0)) / 2**20,
            "gpu": quantity(amounts.get("nvidia.com/gpu", 0))}


def _add(a: dict, b: dict) -> dict:
    return {key: a.get(key, 0) + b.get(key, 0) for key in ("cpu_m", "memory_mib", "gpu")}


def pod_requests(pod: dict, extra_containers=(), extra_init=()) -> dict:
    """What the scheduler reserves for a pod: its containers and native sidecars (init containers with
    restartPolicy Always) together, or more while an init container runs beside the sidecars before it."""
    running, sidecars, peak = {}, {}, {}
    for init in [*pod.get("initContainers", []), *extra_init]:
        if init.get("restartPolicy") == "Always":
            sidecars = _add(sidecars, container_requests(init.get("resources") or {}))
        else:
            during = _add(sidecars, container_requests(init.get("resources") or {}))
            peak = {k: max(peak.get(k, 0), v) for k, v in during.items()}
    for container in [*pod["containers"], *extra_containers]:
        running = _add(running, container_requests(container.get("resources") or {}))
    running = _add(running, sidecars)
    return {k: max(running.get(k, 0), peak.get(k, 0)) for k in ("cpu_m", "memory_mib", "gpu")}


def ray_pods(spec: dict) -> list[tuple[str, dict, dict]]:
    """(name, pod spec, requests) of the RayCluster's pods, with what KubeRay adds to them."""
    head = spec["headGroupSpec"]["template"]["spec"]
    autoscaler = {"resources": (spec.get("autoscalerOptions") or {}).get("resources") or KUBERAY_AUTOSCALER}
    pods = [("head", head, pod_requests(head, [autoscaler] if spec.get("enableInTreeAutoscaling") else []))]
    for group in spec.get("workerGroupSpecs", []):
        pod = group["template"]["spec"]
        pods.append((group["groupName"], pod, pod_requests(pod, extra_init=[{"resources": KUBERAY_WAIT_GCS}])))
    return pods


def other_pods() -> list[tuple[str, dict, dict]]:
    """(name, pod spec, requests) of the pods beside the Ray pods: the Redis cache, the shell, and a
    RayJob's submitter (KubeRay's default template: no nodeSelector, and only the head pool has room)."""
    redis = k8s_object(KUBERAY / "redis.yaml", "Deployment")["spec"]["template"]["spec"]
    shell = k8s_object(KUBERAY / "storage.yaml", "Pod")["spec"]
    submitter = {"nodeSelector": {POOL_LABEL: "head"}, "containers": [{"resources": KUBERAY_SUBMITTER}]}
    return [(name, pod, pod_requests(pod)) for name, pod in
            (("mtkd-redis", redis), ("mtkd-shell", shell), ("rayjob submitter", submitter))]


def pool_problems(spec: dict, others: list[tuple[str, dict, dict]]) -> list[str]:
    """Each pool's pods against every node type docs/cluster.md names for it: the Ray pods of a
    pool, one per node, and the other pods of the head pool, all on one node."""
    problems, by_pool = [], {}
    workers = {group["groupName"] for group in spec.get("workerGroupSpecs", [])}
    for name, pod, requests in [*ray_pods(spec), *others]:
        pool = (pod.get("nodeSelector") or {}).get(POOL_LABEL)
        if pool not in {node.pool for node in NODE_TYPES}:
            problems.append(f"{name}: nodeSelector {POOL_LABEL} {pool!r} is not a pool of docs/cluster.md")
            # Still size it against the nodes it is meant for.
            pool = "teacher" if requests["gpu"] else "learner" if name in workers else "head"
        by_pool.setdefault(pool, []).append((name, requests))
    for node in NODE_TYPES:
        pods = by_pool.get(node.pool, [])
        if node.pool != "head":
            pods = [[p] for p in pods]      # one Ray worker pod per node
        else:
            pods = [pods]                   # the head pod, Redis, the shell and the submitter together
        for together in pods:
            total = {}
            for _, requests in together:
                total = _add(total, requests)
            names = " + ".join(name for name, _ in together)
            room, free = allocatable(node), usable(node)
            for key, unit in (("cpu_m", "m CPU"), ("memory_mib", " MiB"), ("gpu", " GPU")):
                if total.get(key, 0) > room[key]:
                    problems.append(f"{node.pool} pool, {node.cloud} {node.name}: {names} request "
                                    f"{total[key]:.0f}{unit} > allocatable {room[key]:.0f}{unit}: Pending forever")
                elif total.get(key, 0) > free[key] + 1e-6:
                    problems.append(f"{node.pool} pool, {node.cloud} {node.name}: {names} request "
                                    f"{total[key]:.0f}{unit}, leaving less than the headroom for DaemonSets "
                                    f"and the kernel (at most {free[key]:.0f}{unit})")
    return problems


def doc_node_table() -> dict:
    """docs/cluster.md's table of node types: (pool, cloud, type) -> its cells."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and cells[0] in {n.pool for n in NODE_TYPES} and cells[1] in ("EKS", "GKE"):
            rows[(cells[0], cells[1], cells[2])] = cells
    return rows


def placement_timeout_s(experiment: ExperimentConfig) -> float:
    """How long the driver waits for its teacher actors to be placed."""
    timeout = getattr(experiment.runtime, "placement_timeout_s", None)
    if timeout is None:  # an mtkd without runtime.placement_timeout_s: the driver's constant
        from services.learner.driver import PLACEMENT_TIMEOUT_S as timeout
    return float(timeout)


def autoscaler_problems(spec: dict, experiment: ExperimentConfig) -> list[str]:
    """An autoscaling RayCluster must not reclaim idle workers while the driver waits for placement;
    one without autoscaling must have fixed replicas."""
    wait = placement_timeout_s(experiment)
    if not spec.get("enableInTreeAutoscaling"):
        return [f"{g['groupName']}: without autoscaling, replicas, minReplicas and maxReplicas must be equal"
                for g in spec.get("workerGroupSpecs", [])
                if not g.get("replicas") == g.get("minReplicas") == g.get("maxReplicas")]
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", KUBERAY_DEFAULT_IDLE_TIMEOUT_S)
    problems = [] if idle >= wait else [
        f"autoscalerOptions.idleTimeoutSeconds {idle} < {wait:.0f} s, the driver's wait for teacher placement: "
        f"idle learner pods are reclaimed while it waits"]
    for group in spec.get("workerGroupSpecs", []):
        if group.get("idleTimeoutSeconds", wait) < wait:
            problems.append(f"{group['groupName']}.idleTimeoutSeconds {group['idleTimeoutSeconds']} < {wait:.0f} s")
    return problems


# ----------------------------------------------------------------------------- images, storage, logs
def built_images() -> dict[str, str]:
    """The images docs/cluster.md builds from deploy/Dockerfile: image -> FLAVOR."""
    built = {}
    for line in doc_code_lines():
        for words in shell_segments(line):
            if words[:4] == ["docker", "build", "-f", "deploy/Dockerfile"]:
                flavor = next((w.split("=", 1)[1] for w in words if w.startswith("FLAVOR=")), None)
                built[words[words.index("-t") + 1]] = flavor
    return built


def _pod_containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def image_problems(spec: dict, launcher_config: dict, others: list[tuple[str, dict, dict]]) -> list[str]:
    """CPU pods run the CPU image, GPU containers the GPU image (both built by deploy/Dockerfile)."""
    built, problems = built_images(), []
    for name, pod, _ in [*ray_pods(spec), *others]:
        for container in _pod_containers(pod):
            image = container.get("image")
            if image is None or not image.startswith("registry.example.com/"):
                continue                     # KubeRay's defaults, the official redis image
            flavor = built.get(image)
            gpu = container_requests(container.get("resources") or {})["gpu"] > 0
            if flavor is None:
                problems.append(f"{name}/{container['name']}: {image} is not an image docs/cluster.md builds")
            elif gpu and flavor != "gpu":
                problems.append(f"{name}/{container['name']} asks for a GPU but runs the {flavor} image {image}")
            elif not gpu and flavor != "cpu":
                problems.append(f"{name}/{container['name']} needs no GPU but runs the {flavor} image {image}")
    types = launcher_config["available_node_types"]
    docker = launcher_config.get("docker", {})
    for type_name, node_type in types.items():
        head = type_name == launcher_config["head_node_type"]
        image = (docker.get("head_image") if head else (node_type.get("docker") or {}).get("worker_image")
                 or docker.get("worker_image")) or docker.get("image")
        gpu = bool(re.match(r"^(g|p)\d", node_type["node_config"].get("InstanceType", "")))
        if built.get(image) != ("gpu" if gpu else "cpu"):
            problems.append(f"cluster.yaml {type_name} ({'GPU' if gpu else 'CPU'} node) runs {image} "
                            f"({built.get(image)} image)")
    return problems


def image_user() -> tuple[int, int]:
    """The uid and gid the Dockerfile gives the repository (COPY --chown=uid:gid): the image's user."""
    for instruction, rest in dockerfile_instructions():
        match = re.search(r"--chown=(\d+):(\d+)", rest) if instruction == "COPY" else None
        if match:
            return int(match.group(1)), int(match.group(2))
    raise AssertionError("deploy/Dockerfile: no COPY --chown=uid:gid")


STORAGE_CLASS_PLACEHOLDER = "REPLACE_ME_rwx_storage_class"
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def storage_problems(claim: dict, pods: list[tuple[str, dict]]) -> list[str]:
    """The shared claim names a ReadWriteMany class, and every pod mounting it runs as the image's
    user with the image's group as fsGroup."""
    problems, (uid, gid) = [], image_user()
    if not claim["spec"].get("storageClassName"):
        problems.append("the PVC names no storageClassName: the cluster's default class (block storage, "
                        "ReadWriteOnce, on EKS, GKE and AKS) leaves it, and every Ray pod, Pending")
    if "ReadWriteMany" not in claim["spec"].get("accessModes", []):
        problems.append("the PVC is not ReadWriteMany: pods on several nodes mount it")
    for name, pod in pods:
        claims = {v["name"] for v in pod.get("volumes", []) if (v.get("persistentVolumeClaim") or {})
                  .get("claimName") == claim["metadata"]["name"]}
        if not claims:
            continue
        context = pod.get("securityContext") or {}
        for container in _pod_containers(pod):
            if not claims & {m["name"] for m in container.get("volumeMounts", [])}:
                continue
            own = {**context, **(container.get("securityContext") or {})}
            if own.get("runAsUser") == 0:
                continue                     # the shell's `prepare` step, which chowns for the others
            if (own.get("runAsUser"), own.get("runAsGroup"), context.get("fsGroup")) != (uid, gid, gid):
                problems.append(f"{name}/{container['name']}: runs as {own.get('runAsUser')}:{own.get('runAsGroup')}"
                                f" with fsGroup {context.get('fsGroup')}, not the image's {uid}:{gid} (fsGroup "
                                f"{gid}): the shared volume may not be writable")
    return problems


LOG_DIR = f"{SHARED}/ray_logs"


def log_problems(spec: dict) -> list[str]:
    """Ray's logs (/tmp/ray, an emptyDir) outlive each pod: a sidecar copies them to the shared volume."""
    problems = []
    for name, pod, _ in ray_pods(spec):
        ray = pod["containers"][0]
        logs = {m["name"] for m in ray.get("volumeMounts", []) if m["mountPath"] == "/tmp/ray"}
        shared = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        copiers = [c for c in [*pod.get("initContainers", []), *pod["containers"][1:]]
                   if (c.get("restartPolicy") == "Always" or c in pod["containers"])
                   and logs & {m["name"] for m in c.get("volumeMounts", [])}
                   and any(m["name"] in shared and m["mountPath"] == SHARED for m in c.get("volumeMounts", []))
                   and LOG_DIR in " ".join(map(str, [*c.get("command", []), *c.get("args", [])]))
                   and "/tmp/ray/session_latest/logs" in " ".join(map(str, c.get("args", [])))]
        if not logs or not copiers:
            problems.append(f"{name}: Ray's logs (/tmp/ray) stay in the pod (an emptyDir): no sidecar copies "
                            f"them to {LOG_DIR}, so they vanish with the pod")
    return problems


# ----------------------------------------------------------------------------- RayJobs
def cluster_spec_copies() -> list[str]:
    """Files under deploy/ that hold a RayCluster spec (a headGroupSpec): raycluster.yaml only."""
    def holds(node) -> bool:
        if isinstance(node, dict):
            return "headGroupSpec" in node or any(holds(v) for v in node.values())
        return isinstance(node, list) and any(holds(v) for v in node)
    return [str(path.relative_to(REPO)) for path in YAML_FILES if any(holds(doc) for doc in yaml_docs(path))]


def rayjob_problems(job: dict, cluster: dict, experiment: ExperimentConfig) -> list[str]:
    """A RayJob either runs on the long-lived RayCluster (clusterSelector) or on its own copy of it,
    deleted after the run; either way with deadlines."""
    spec, problems = job["spec"], []
    selector = spec.get("clusterSelector")
    if selector and "rayClusterSpec" in spec:
        problems.append("clusterSelector and rayClusterSpec together")
    if selector:
        if selector != {"ray.io/cluster": cluster["metadata"]["name"]}:
            problems.append(f"clusterSelector {selector} does not select the RayCluster {cluster['metadata']['name']}")
        if spec.get("shutdownAfterJobFinishes") or spec.get("ttlSecondsAfterFinished"):
            problems.append("shutdownAfterJobFinishes/ttlSecondsAfterFinished on a selected, shared cluster")
        if (spec.get("backoffLimit") or 0) > 0 or spec.get("submissionMode") == "SidecarMode":
            problems.append("KubeRay refuses backoffLimit > 0 and SidecarMode with clusterSelector")
    elif "rayClusterSpec" in spec:
        if spec["rayClusterSpec"] != cluster["spec"]:
            problems.append("the RayJob's rayClusterSpec differs from raycluster.yaml's spec")
        if spec.get("shutdownAfterJobFinishes") is not True or not spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append("a RayJob's own cluster needs shutdownAfterJobFinishes: true and "
                            "ttlSecondsAfterFinished > 0, or it outlives the run")
    else:
        problems.append("neither clusterSelector nor rayClusterSpec")
    active, pre = spec.get("activeDeadlineSeconds"), spec.get("preRunningDeadlineSeconds")
    if not (isinstance(active, int) and active > 0):
        problems.append("no activeDeadlineSeconds: a run that hangs holds the cluster forever")
    elif active <= placement_timeout_s(experiment):
        problems.append(f"activeDeadlineSeconds {active} <= the driver's placement wait")
    if not (isinstance(pre, int) and pre > 0):
        problems.append("no preRunningDeadlineSeconds: a RayJob whose pods stay Pending stays Initializing forever")
    elif isinstance(active, int) and pre >= active:
        problems.append(f"preRunningDeadlineSeconds {pre} >= activeDeadlineSeconds {active}")
    return problems


def own_cluster_objects(path: Path = KUBERAY / "kustomization.yaml") -> list[dict]:
    """What `kubectl kustomize deploy/kuberay` builds, computed here for what the kustomization uses:
    its resources, its JSON-patch patches (add, replace, remove), its replacements (a field copied
    into another object, created if missing), and local-config objects left out of the output."""
    kustomization = yaml.safe_load(path.read_text())
    objects = [doc for name in kustomization["resources"] for doc in yaml_docs(path.parent / name)]

    def selected(obj, target) -> bool:
        group_version = "/".join(filter(None, [target.get("group"), target.get("version")]))
        return (obj.get("kind") == target.get("kind")
                and obj["metadata"]["name"] == target.get("name", obj["metadata"]["name"])
                and (not target.get("version") or obj["apiVersion"] == group_version))

    def parent(obj, pointer: list[str]):
        for key in pointer[:-1]:
            obj = obj.setdefault(key, {})
        return obj

    for patch in kustomization.get("patches", []):
        for obj in [o for o in objects if selected(o, patch["target"])]:
            for op in yaml.safe_load(patch["patch"]):
                pointer = op["path"].strip("/").split("/")
                node = parent(obj, pointer)
                if op["op"] == "remove":
                    del node[pointer[-1]]
                elif op["op"] == "replace" and pointer[-1] not in node:
                    raise AssertionError(f"replace of a missing {op['path']}")
                else:
                    node[pointer[-1]] = copy.deepcopy(op["value"])
    for replacement in kustomization.get("replacements", []):
        source = replacement["source"]
        (origin,) = [o for o in objects if selected(o, source)]
        value = origin
        for key in source["fieldPath"].split("."):
            value = value[key]
        for target in replacement["targets"]:
            for obj in [o for o in objects if selected(o, target["select"])]:
                for field in target["fieldPaths"]:
                    pointer = field.split(".")
                    node = parent(obj, pointer)
                    assert pointer[-1] in node or (target.get("options") or {}).get("create"), field
                    node[pointer[-1]] = copy.deepcopy(value)
    return [o for o in objects
            if (o["metadata"].get("annotations") or {}).get("config.kubernetes.io/local-config") != "true"]


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
    for name in ("cluster.yaml", "runtime_env.yaml", "Dockerfile", "Dockerfile.dockerignore", "kuberay/rayjob.yaml",
                 "kuberay/raycluster.yaml", "kuberay/kustomization.yaml", "kuberay/storage.yaml", "kuberay/redis.yaml"):
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
    assert rayjob_problems(job, cluster, experiment) == []
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in spec, "rayjob.yaml repeats the cluster spec: select raycluster.yaml's cluster"
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)
    # The entrypoint's config is the one the cluster's groups were sized for.
    entry = mtkd_commands_in_line(spec["entrypoint"], "rayjob", relative_paths="working_dir" in runtime_env)
    args = check_mtkd(entry[0])
    assert resolve_config(args.config, False) == CLUSTER_CONFIG


@pytest.mark.parametrize("where, obj", [*k8s_objects(), ("kustomization.yaml (built)", None)],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_every_kubernetes_field_is_a_field_of_its_type(where, obj):
    """Every field of every object in deploy/kuberay/, and of the RayJob the kustomization builds,
    is a field of its ray.io/v1 or core/v1 type: a misspelt one would be dropped by the API server."""
    objects = [obj] if obj is not None else own_cluster_objects()
    for obj in objects:
        assert obj["kind"] in K8S_TYPES, f"{where}: no field list for {obj['kind']}"
        assert unknown_fields(obj, obj["kind"], obj["kind"]) == []


def test_the_field_check_catches_misspelt_fields():
    cluster = copy.deepcopy(raycluster())
    cluster["spec"]["autoscalerOptions"]["idleTimeoutSecond"] = 900
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["securityContext"]["fsgroup"] = 100
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]["restartpolicy"] = "Always"
    job = copy.deepcopy(rayjob())
    job["spec"]["preRunningDeadline"] = 60
    problems = unknown_fields(cluster, "RayCluster", "RayCluster") + unknown_fields(job, "RayJob", "RayJob")
    assert problems == ["RayCluster.spec.autoscalerOptions.idleTimeoutSecond: not a AutoscalerOptions field",
                        "RayCluster.spec.headGroupSpec.template.spec.initContainers[0].restartpolicy: "
                        "not a Container field",
                        "RayCluster.spec.workerGroupSpecs[0].template.spec.securityContext.fsgroup: "
                        "not a PodSecurityContext field",
                        "RayJob.spec.preRunningDeadline: not a RayJobSpec field"]


def test_launcher_config_passes_rays_own_schema():
    """deploy/cluster.yaml against the ray-schema.json that the installed ray package ships, with
    jsonschema (every error, not the first): the schema `ray up` itself validates against."""
    schema = launcher_schema()
    assert schema["title"] == "Ray AutoScaler" and "available_node_types" in schema["properties"]
    assert launcher_schema_problems(launcher()) == []
    broken = copy.deepcopy(launcher())
    broken["available_node_types"]["ray.worker.teacher"]["docker"]["image"] = "x"   # worker_image only
    broken["idle_timeout_minute"] = 15
    problems = launcher_schema_problems(broken)
    assert len(problems) == 2 and "idle_timeout_minute" in problems[0] + problems[1], problems


def test_docs_node_table_is_the_arithmetic():
    """docs/cluster.md's table of node types: each row's allocatable is the cloud's formula."""
    rows = doc_node_table()
    assert set(rows) == {(n.pool, n.cloud, n.name) for n in NODE_TYPES}, set(rows) ^ {(n.pool, n.cloud, n.name)
                                                                                      for n in NODE_TYPES}
    for node in NODE_TYPES:
        cells = rows[(node.pool, node.cloud, node.name)]
        room = allocatable(node)
        expected = [str(node.vcpus), f"{node.memory_gib} GiB", str(node.gpus), str(node.max_pods or "-"),
                    f"{reserved_cpu_m(node):.0f}m", f"{reserved_memory_mib(node):.0f} MiB",
                    f"{room['cpu_m']}m", f"{room['memory_mib']} MiB"]
        assert cells[3:11] == expected, (node, cells)
    # The reservations of the formulas, at the sizes named (EKS: 11 MiB x max pods + 255 MiB).
    by_name = {n.name: n for n in NODE_TYPES}
    assert allocatable(by_name["c6i.4xlarge"]) == {"cpu_m": 15890, "memory_mib": 29839, "gpu": 0}
    assert allocatable(by_name["g5.2xlarge"]) == {"cpu_m": 7910, "memory_mib": 31775, "gpu": 1}
    assert allocatable(by_name["c2d-highcpu-16"]) == {"cpu_m": 15890, "memory_mib": 29022, "gpu": 0}


def test_docs_pod_table_is_what_the_manifests_request():
    """docs/cluster.md's table of pod sizes: each pool's requests on one node, as computed here."""
    documented = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in {n.pool for n in NODE_TYPES} and re.fullmatch(r"\d+m", cells[2]):
            documented[cells[0]] = (cells[2], cells[3])
    computed = {}
    for name, pod, requests in [*ray_pods(raycluster()["spec"]), *other_pods()]:
        pool = pod["nodeSelector"][POOL_LABEL]
        if pool == "head" or pool not in computed:
            computed[pool] = _add(computed.get(pool, {}), requests)
    assert documented == {pool: (f"{r['cpu_m']:.0f}m", f"{r['memory_mib']:.0f} MiB") for pool, r in computed.items()}


def test_pods_fit_every_named_node_type():
    """Each pool's pods (one Ray worker pod per node; the head pod, Redis, the shell and a RayJob's
    submitter together on the head node) request at most the node's allocatable less the headroom."""
    spec = raycluster()["spec"]
    assert pool_problems(spec, other_pods()) == []
    experiment = load_config(ExperimentConfig, CLUSTER_CONFIG)
    # What Ray sees in those pods still holds the run: a learner per learner pod, four teachers per GPU pod.
    assert cluster_spec_problems(spec, experiment) == []


def test_launcher_node_types_are_the_documented_ones():
    """deploy/cluster.yaml's instance types are the EKS node types of docs/cluster.md's pools, and the
    run fits what Ray detects on them (all the vCPUs and GPUs of the instance)."""
    config, experiment = launcher(), load_config(ExperimentConfig, CLUSTER_CONFIG)
    eks = {n.pool: n for n in NODE_TYPES if n.cloud == "EKS"}
    types = config["available_node_types"]
    pools = {config["head_node_type"]: "head"} | {
        name: "teacher" if t["resources"].get("teacher_node") else "learner"
        for name, t in types.items() if name != config["head_node_type"]}
    for name, pool in pools.items():
        assert types[name]["node_config"]["InstanceType"] == eks[pool].name, (name, pool)
    learner = eks["learner"]
    assert experiment.runtime.learner_num_cpus <= learner.vcpus - 1, "leave a vCPU to Ray's own processes"
    replicas = types[next(n for n, p in pools.items() if p == "teacher")]["resources"]["teacher_node"]
    largest = teacher_demand(experiment)["largest"]
    assert replicas * largest["CPU"] <= eks["teacher"].vcpus and replicas * largest["GPU"] <= eks["teacher"].gpus


def test_autoscalers_outlive_the_placement_wait():
    experiment = load_config(ExperimentConfig, CLUSTER_CONFIG)
    assert autoscaler_problems(raycluster()["spec"], experiment) == []
    assert launcher()["idle_timeout_minutes"] * 60 >= placement_timeout_s(experiment)


def test_cpu_image_for_head_and_learners_gpu_image_for_teachers():
    assert image_problems(raycluster()["spec"], launcher(), other_pods()) == []
    assert set(built_images().values()) == {"cpu", "gpu"}, built_images()


def test_dockerfile_matches_pyproject():
    facts = dockerfile_facts()
    official = r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-(?P<device>gpu|cpu|cu\d+)"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    for flavor in ("cpu", "gpu"):
        build = dockerfile_build(flavor)
        match = re.fullmatch(official, build["base"])
        assert match, f"FLAVOR={flavor}: base image {build['base']!r} is not an official rayproject/ray image"
        assert (match["device"] == "cpu") == (flavor == "cpu"), f"FLAVOR={flavor} builds on {build['base']}"
        assert match["ray"] == pyproject_pin("ray"), f"base image Ray {match['ray']} != {pyproject_pin('ray')}"
        assert f">={match['py']}.{match['minor']}" in requires, f"image Python {match['py']}.{match['minor']}"
        runs = " ".join(build["runs"])
        pins = re.findall(r"torch==([\w.+]+)", runs)
        assert pins == [pyproject_pin("torch")], f"FLAVOR={flavor}: torch pins {pins}"
        # The CPU image takes the CPU wheel (no CUDA libraries); the GPU image PyPI's CUDA build.
        cpu_index = "download.pytorch.org/whl/cpu" in runs
        assert cpu_index == (flavor == "cpu"), f"FLAVOR={flavor}: torch from {'the CPU' if cpu_index else 'PyPI'}"
        assert re.search(r"pip install[^&]*'\.\[service\]'", runs), "pip install '.[service]'"
        assert not re.search(r"\b(curl|wget)\b", runs), "no downloads in the build: data comes from mounted storage"
    assert facts["workdir"] == image_repo(), "WORKDIR is the repository copied into the image"
    ignored = {line.strip().rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "cache"} <= ignored


def test_shared_volume_needs_a_real_class_and_is_writable_by_the_image_user():
    claim = k8s_object(KUBERAY / "storage.yaml", "PersistentVolumeClaim")
    pods = [(name, pod) for name, pod, _ in [*ray_pods(raycluster()["spec"]), *other_pods()]]
    assert storage_problems(claim, pods) == []
    # The class is a placeholder the API server refuses (not a DNS-1123 subdomain), named in the docs.
    assert claim["spec"]["storageClassName"] == STORAGE_CLASS_PLACEHOLDER
    assert not DNS1123_SUBDOMAIN.fullmatch(STORAGE_CLASS_PLACEHOLDER)
    assert STORAGE_CLASS_PLACEHOLDER in DOCS.read_text()
    # Where fsGroup does not apply (NFS shares), the shell's root step gives the folders to the image's user.
    uid, gid = image_user()
    prepare = next(c for c in k8s_object(KUBERAY / "storage.yaml", "Pod")["spec"]["initContainers"]
                   if (c.get("securityContext") or {}).get("runAsUser") == 0)
    script = " ".join(prepare["args"])
    for folder in ("runs", "ray_storage", "ray_logs", "teachers", "data"):
        assert folder in script.split("chown", 1)[1], f"the prepare step does not chown {folder}"
    assert f"chown {uid}:{gid} " in script
    assert any(f"chown {uid}:{gid} {SHARED}" in line for line in launcher()["initialization_commands"])


def test_ray_logs_outlive_the_pods():
    assert log_problems(raycluster()["spec"]) == []


def test_the_cluster_spec_is_written_once():
    assert cluster_spec_copies() == ["deploy/kuberay/raycluster.yaml"]


def test_rayjob_on_its_own_cluster_is_built_from_raycluster_yaml():
    """`kubectl apply -k deploy/kuberay`: one RayJob whose rayClusterSpec is raycluster.yaml's spec,
    deleted after the run, with the deadlines of rayjob.yaml; nothing else (no RayCluster `mtkd`)."""
    built = own_cluster_objects()
    assert [o["kind"] for o in built] == ["RayJob"], [o["kind"] for o in built]
    job = built[0]
    assert rayjob_problems(job, raycluster(), load_config(ExperimentConfig, CLUSTER_CONFIG)) == []
    assert job["spec"]["rayClusterSpec"] == raycluster()["spec"] and "clusterSelector" not in job["spec"]
    assert job["spec"]["entrypoint"] == rayjob()["spec"]["entrypoint"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kubectl_kustomize_builds_the_same_rayjob():
    """The same build with kubectl's own kustomize (offline: no cluster is contacted)."""
    result = subprocess.run(["kubectl", "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [d for d in yaml.safe_load_all(result.stdout) if d] == own_cluster_objects()


def test_kuberay_docs_name_every_step():
    code = "\n".join(doc_code_lines())
    for step in ("kubectl apply -f deploy/kuberay/raycluster.yaml", "kubectl apply -f deploy/kuberay/rayjob.yaml",
                 "kubectl apply -k deploy/kuberay", "kubectl kustomize deploy/kuberay",
                 "--build-arg FLAVOR=cpu", "--build-arg FLAVOR=gpu", f"{POOL_LABEL}="):
        assert step in code, f"docs/cluster.md: no `{step}` in a code block"


# ----------------------------------------------------------------------------- each listed defect is caught
def deploy_state() -> dict:
    """The deploy files as the checks below read them (copies: a test may break them)."""
    return copy.deepcopy({"cluster": raycluster(), "job": rayjob(), "launcher": launcher(),
                          "claim": k8s_object(KUBERAY / "storage.yaml", "PersistentVolumeClaim"),
                          "others": [(name, pod) for name, pod, _ in other_pods()]})


def deploy_problems(state: dict) -> list[str]:
    """Every check of this file that the listed defects concern, on ``state``."""
    experiment = load_config(ExperimentConfig, CLUSTER_CONFIG)
    spec = state["cluster"]["spec"]
    others = [(name, pod, pod_requests(pod)) for name, pod in state["others"]]
    pods = [(name, pod) for name, pod, _ in ray_pods(spec)] + state["others"]
    problems = [*pool_problems(spec, others), *autoscaler_problems(spec, experiment),
                *launcher_problems(state["launcher"], experiment), *image_problems(spec, state["launcher"], others),
                *storage_problems(state["claim"], pods), *log_problems(spec),
                *rayjob_problems(state["job"], state["cluster"], experiment)]
    if "rayClusterSpec" in state["job"]["spec"]:
        problems.append("rayjob.yaml repeats the cluster spec of raycluster.yaml (select it: clusterSelector)")
    return problems


def test_the_shipped_files_have_none_of_the_defects():
    assert deploy_problems(deploy_state()) == []


def _old_requests(state):
    for group in state["cluster"]["spec"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        size = {"cpu": "16", "memory": "32Gi"} if group["groupName"] == "learners" else {"cpu": "8", "memory": "32Gi"}
        resources["requests"].update(size)
        resources["limits"].update(size)


def _one_cuda_image(state):
    gpu = next(image for image, flavor in built_images().items() if flavor == "gpu")
    for _, pod, _ in ray_pods(state["cluster"]["spec"]):
        for container in _pod_containers(pod):
            container["image"] = gpu
    state["launcher"]["docker"]["image"] = gpu


def _logs_in_an_empty_dir(state):
    for _, pod, _ in ray_pods(state["cluster"]["spec"]):
        pod.pop("initContainers", None)


def _duplicated_spec(state):
    state["job"]["spec"].pop("clusterSelector")
    state["job"]["spec"].update(rayClusterSpec=copy.deepcopy(state["cluster"]["spec"]),
                                shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600)


@pytest.mark.parametrize("defect, mutate, message", [
    ("requests above the nodes' allocatable", _old_requests, "c6i.4xlarge: learners request 16100m CPU > allocatable"),
    ("the head pool overfilled", lambda s: s["others"][1][1]["containers"][0]["resources"]["requests"]
     .update(memory="8Gi"), "leaving less than the headroom"),
    ("the PVC's storage class commented out", lambda s: s["claim"]["spec"].pop("storageClassName"),
     "names no storageClassName"),
    ("a claim that is not ReadWriteMany", lambda s: s["claim"]["spec"].update(accessModes=["ReadWriteOnce"]),
     "not ReadWriteMany"),
    ("pods not running as the image's uid/gid", lambda s: s["cluster"]["spec"]["workerGroupSpecs"][0]["template"]
     ["spec"].pop("securityContext"), "learners/ray-worker: runs as None:None"),
    ("the autoscaler's default 60 s idle timeout", lambda s: s["cluster"]["spec"].pop("autoscalerOptions"),
     "idleTimeoutSeconds 60 < 600 s"),
    ("the launcher's idle timeout under the placement wait", lambda s: s["launcher"].update(idle_timeout_minutes=5),
     "idle_timeout_minutes 5 < 600 s"),
    ("one CUDA image for everything", _one_cuda_image, "head/ray-head needs no GPU but runs the gpu image"),
    ("one CUDA image for everything (launcher)", _one_cuda_image, "ray.head.default (CPU node) runs"),
    ("logs in an emptyDir", _logs_in_an_empty_dir, "learners: Ray's logs (/tmp/ray) stay in the pod"),
    ("the cluster spec duplicated in the RayJob", _duplicated_spec, "repeats the cluster spec"),
    ("no activeDeadlineSeconds", lambda s: s["job"]["spec"].pop("activeDeadlineSeconds"), "no activeDeadlineSeconds"),
    ("no preRunningDeadlineSeconds", lambda s: s["job"]["spec"].pop("preRunningDeadlineSeconds"),
     "no preRunningDeadlineSeconds"),
    ("an own cluster never deleted", lambda s: (_duplicated_spec(s), s["job"]["spec"].pop("ttlSecondsAfterFinished")),
     "outlives the run"),
])
def test_each_listed_defect_is_caught(defect, mutate, message):
    state = deploy_state()
    mutate(state)
    problems = deploy_problems(state)
    assert any(message in p for p in problems), (defect, problems)


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
