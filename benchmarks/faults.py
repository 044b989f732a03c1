"""Fault injection on a real Ray: does ``mtkd distill`` lose nothing when a process dies under it?

Every run is a subprocess of the ``mtkd distill`` command a user runs, on a private local Ray
(``--address local``), or, for the node fault, on a simulated cluster of three nodes on this host
(``ray.cluster_utils.Cluster``, started by this script). The config is tiny (a resnet8 student, two
small teachers trained here once, 256 Fashion-MNIST images, 8 steps per epoch, 3 epochs, the
``reference`` agent rule so that there is an agent actor, a private Redis cache: ``cache.url=local``).

A trial starts the run, waits for a random step (seeded; after the first epoch's checkpoint and
before the last epoch's third step) plus up to half a second, then injects its fault:

* ``driver_kill9``: SIGKILL to the ``mtkd distill`` process, then ``mtkd distill --resume``;
* ``driver_sigterm``: SIGTERM to it (a clean stop, exit 143 and a resume line), then ``--resume``;
* ``teacher_kill9`` / ``agent_kill9`` / ``learner_kill9`` / ``redis_kill9``: SIGKILL to one
  teacher replica (chosen at random), the agent actor, the Ray Train learner worker, the
  ``redis-server`` of the cache; Ray restarts actors and workers by itself and the run continues;
* ``node_removal``: the cluster node hosting teacher 0 is removed (its raylet and workers killed);
  the teacher is restarted on the other node that offers its resource;
* ``raylet_kill9`` / ``gcs_kill9`` / ``dashboard_agent_kill9``: SIGKILL to the private Ray's raylet,
  its GCS (``gcs_server``) or its dashboard agent (``dashboard/agent.py``, ``ray::DashboardAgent``: the
  raylet starts one even without the dashboard); Ray does not restart these, so the run is expected to
  end with one line (``lost ...; continue with: mtkd distill --resume RUN``, exit 4), then resume. A run
  still going :data:`RAY_FAULT_TIMEOUT_S` after such a fault counts as hung: it is killed (SIGKILL),
  recorded as ``timeout``, then resumed;
* ``unwritable``: the run folder is made read-only (``chmod -R a-w``; the run is started without
  ``CAP_DAC_OVERRIDE`` so that this binds root too), made writable again once the run has stopped
  (or after 30 s), then resumed if it stopped.

A run that stops is resumed with ``--resume`` when a valid checkpoint exists, else started again
with the same command; at most twice. Each trial records:

* ``finished``: ``direct`` (the run ended by itself with exit 0), ``resumed`` (after one or more
  resumes), or ``no``;
* ``identical``: the exported student (``RUN/student/weights.safetensors``) equals, tensor by tensor
  and bit for bit, that of an uninterrupted reference run of the same config;
* ``epochs_once``: ``metrics.jsonl`` lists every epoch exactly once, in order;
* ``left_over``: processes of the trial (the ``mtkd`` process and everything below it: raylet, GCS,
  workers, ``redis-server``; on the cluster, the run's actors) still alive 20 s after the run ended
  (they are then killed, so that trials do not pile up);
* ``checkpoints_lost``: checkpoints complete and valid just before the fault that are missing or
  fail their digests right after the run stopped or ended, unless pruning removed them (two newer
  valid checkpoints exist: the ``keep`` rule);
* the exit code and last stderr line of each ``mtkd`` process (``timeout``: killed as hung), and for
  a run that stopped by itself (an exit code above 0) whether that line is the one line saying how to
  go on (``one_line``: ``mtkd: error: lost ...; continue with: mtkd distill --resume RUN``, or
  ``stopped after epoch N; continue with: ...``), not a Ray traceback or log line.

Writes ``--out`` (JSON) and prints a markdown table; ``--merge`` replaces only the trials of the faults
run in an existing ``--out`` (the other faults' trials are kept) and recomputes its summary.

    .venv/bin/python benchmarks/faults.py                     # every fault, 3 trials each
    .venv/bin/python benchmarks/faults.py --quick             # CI: driver_kill9, 1 trial, 2 epochs of 4 steps
    .venv/bin/python benchmarks/faults.py --quick --faults driver_kill9,agent_kill9
    .venv/bin/python benchmarks/faults.py --faults agent_kill9,redis_kill9 --trials 5 --seed 3
    .venv/bin/python benchmarks/faults.py --faults raylet_kill9,gcs_kill9,dashboard_agent_kill9 --merge
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import process_alive, process_tree  # noqa: E402

STEPS_PER_EPOCH = 8  # --quick: 4
EPOCHS = 3  # --quick: 2
RUN_TIMEOUT_S = 300.0
GRACE_S = 20.0  # how long processes may take to go after the run ended
LINE_CHARS = 1000  # of a run's last stderr line kept (200 before the one-line check: such a line is not judged)
UNWRITABLE_S = 30.0
# a killed raylet or GCS is not restarted: the run should end by itself. Ray's own reconnection limit to
# a lost GCS is 60 s (gcs_rpc_server_reconnect_timeout_s), so a run still going this long after is hung
RAY_FAULT_TIMEOUT_S = 150.0
RAY_FAULTS = ("raylet_kill9", "gcs_kill9", "dashboard_agent_kill9")
FAULTS = ("driver_kill9", "driver_sigterm", "teacher_kill9", "agent_kill9", "learner_kill9", "redis_kill9",
          "node_removal", "unwritable", *RAY_FAULTS)
# the last stderr line of a run that stopped by itself (a lost raylet: exit 4; an unwritable folder: 2; SIGTERM: 143)
ONE_LINE = re.compile(r"^(mtkd: error: .+ |stopped )(after epoch \d+; continue with: mtkd distill --resume \S+|before "
                      r"the first checkpoint; nothing to continue in \S+: run the same command again)$"
                      # said by the watchdog when Ray itself ended the command (it cannot read the checkpoints)
                      r"|^mtkd: error: lost the raylet of the private Ray \(.+\); continue with: mtkd distill --resume \S+$")
QUICK_FAULTS = ("driver_kill9",)  # the CI test's budget (about a minute) holds three runs: reference, kill, resume
# processes a cluster keeps for itself (not the run's): idle workers, the per-node agents, and Ray
# Train's detached autoscaling coordinator (one per cluster, shared by its jobs); they end with the
# cluster, which each node_removal trial shuts down and checks
CLUSTER_OWN = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::_AutoscalingCoordinatorActor")


# ------------------------------------------------------------------------------- processes
def cmdline(pid: int) -> str:
    """The command line (or Ray's process title) of ``pid``; '' when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart), or None when it is gone."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Tracker:
    """Every process seen below ``root`` (``root`` included) while the run lives: ``pid -> (start, name)``."""

    def __init__(self, root: int, skip: set[int] = frozenset()):
        self.root = root
        self.skip = set(skip)
        self.seen: dict[int, tuple[int, str]] = {}

    def poll(self) -> None:
        """Record the processes below the root now."""
        for pid in process_tree(self.root):
            if pid not in self.seen and pid not in self.skip:
                started = start_time(pid)
                if started is not None:
                    self.seen[pid] = (started, cmdline(pid)[:80])

    def alive(self) -> list[int]:
        """The recorded processes still running (same pid and start time)."""
        return [pid for pid, (started, _) in self.seen.items() if process_alive(pid) and start_time(pid) == started]

    def find(self, prefix: str) -> list[int]:
        """Alive processes whose command line starts with ``prefix`` (read now: Ray renames its workers)."""
        self.poll()
        return sorted(pid for pid in self.alive() if cmdline(pid).startswith(prefix))


def left_over(tracker: Tracker, keep=lambda pid: False) -> list[str]:
    """Wait up to :data:`GRACE_S` for the tracked processes to go; SIGKILL and name those left
    (``keep``: processes that may stay, e.g. a cluster's own)."""
    deadline = time.time() + GRACE_S
    while True:
        alive = [pid for pid in tracker.alive() if not keep(pid)]
        if not alive or time.time() > deadline:
            break
        time.sleep(0.5)
    names = [f"{pid} {cmdline(pid)[:60]}" for pid in alive]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return names


# ------------------------------------------------------------------------------- runs
def mtkd_command() -> list[str]:
    """The installed ``mtkd`` console script next to this Python (else ``python -m services.cli``)."""
    script = Path(sys.executable).parent / "mtkd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


def teachers(work: Path) -> list[str]:
    """Two small teachers (resnet8, vgg8; 1 epoch on 1536 images), trained into ``work`` once."""
    from mtkd.config import DataConfig, OptimConfig, TeacherTrainConfig
    from mtkd.teacher_training import train_teacher

    folders = []
    for model in ("resnet8", "vgg8"):
        folder = work / "teachers" / model
        if not (folder / "meta.json").is_file():
            train_teacher(TeacherTrainConfig(
                model=model, output_dir=str(folder), seed=1, threads=1,
                data=DataConfig(train_subset=1536, test_subset=256, batch_size=32, crop_padding=2),
                optim=OptimConfig(epochs=1, lr=0.05, nesterov=False, weight_decay=5e-4, milestones=[])),
                progress=False)
        folders.append(str(folder))
    return folders


def overrides(teacher_dirs: list[str], run_dir: Path, on_cluster: bool = False) -> list[str]:
    """The tiny experiment (on the cluster, teacher 0 asks for the ``teacher_node`` resource)."""
    first = f"{{checkpoint: {teacher_dirs[0]}" + (", num_cpus: 0, resources: {teacher_node: 1}}" if on_cluster else "}")
    return [f"output_dir={run_dir}", f"teachers=[{first}, {{checkpoint: {teacher_dirs[1]}}}]", "student=resnet8",
            f"data.train_subset={32 * STEPS_PER_EPOCH}", "data.test_subset=64", "data.batch_size=32",
            "data.crop_padding=2", f"optim.epochs={EPOCHS}", "optim.milestones=[2]", "distill.strategy=mtkd_rl",
            "agent.rule=reference", "agent.agent_step=4", "runtime.device=cpu", "runtime.teacher_precision=fp32",
            "runtime.threads=1", "cache.url=local"]


def environment() -> dict:
    """The runs' environment: one thread per process, Ray Train's fast health checks."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@dataclass
class Launch:
    """One ``mtkd distill`` process and what it left."""

    args: list[str]
    proc: subprocess.Popen
    tracker: Tracker
    log: Path
    returncode: int | None = None
    timed_out: bool = False

    def last_line(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:LINE_CHARS] if lines else ""


def launch(args: list[str], log: Path, prefix: list[str] = (), skip: set[int] = frozenset()) -> Launch:
    """Start ``mtkd distill ARGS`` (stderr to ``log``); ``prefix`` wraps the command (setpriv)."""
    handle = log.open("w")
    proc = subprocess.Popen([*prefix, *mtkd_command(), "distill", "--quiet", *args], cwd=REPO, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=handle, start_new_session=True)
    handle.close()
    tracker = Tracker(proc.pid, skip)
    tracker.poll()
    return Launch(args, proc, tracker, log)


def wait(run: Launch, timeout: float = RUN_TIMEOUT_S) -> int:
    """Wait for the process (polling its tree); on timeout SIGKILL it: returncode -9."""
    deadline = time.time() + timeout
    while run.proc.poll() is None and time.time() < deadline:
        run.tracker.poll()
        time.sleep(0.25)
    if run.proc.poll() is None:
        run.timed_out = True
        run.proc.kill()
    run.returncode = run.proc.wait()
    return run.returncode


def steps_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "steps.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_for_step(run: Launch, run_dir: Path, step: int) -> bool:
    """Poll until ``steps.jsonl`` has ``step`` lines; False if the process ended first."""
    deadline = time.time() + RUN_TIMEOUT_S
    while steps_done(run_dir) < step:
        if run.proc.poll() is not None or time.time() > deadline:
            return False
        run.tracker.poll()
        time.sleep(0.1)
    return True


# ------------------------------------------------------------------------------- checks
def valid_checkpoints(run_dir: Path) -> dict[str, int]:
    """Complete checkpoints of either runtime in the run folder whose files match their digests: path -> epoch."""
    from mtkd.checkpoint import CheckpointError
    from mtkd.experiment import load_checkpoint

    found = {}
    folders = sorted(run_dir.glob("checkpoints/epoch_*")) + sorted(run_dir.glob("ray/*/checkpoint_*"))
    for folder in folders:
        try:
            found[str(folder)] = int(load_checkpoint(folder)[1].get("epoch", 0))
        except (CheckpointError, OSError, ValueError, RuntimeError):
            continue
    return found


def lost_checkpoints(before: dict[str, int], run_dir: Path) -> list[str]:
    """Checkpoints of ``before`` missing or invalid now that pruning (keep the 2 newest valid) does not explain."""
    now = valid_checkpoints(run_dir)
    return [path for path, epoch in before.items()
            if path not in now and sum(e > epoch for e in now.values()) < 2]


def student_state(run_dir: Path) -> dict | None:
    from mtkd.checkpoint import CheckpointError, load_weights

    try:
        return load_weights(run_dir / "student" / "weights.safetensors")
    except CheckpointError:
        return None


def identical(a: dict | None, b: dict | None) -> bool:
    """Same tensor names, dtypes and bytes."""
    import torch

    return a is not None and b is not None and a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def epochs_once(run_dir: Path) -> bool:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    return [json.loads(line).get("epoch") for line in lines if line.strip()] == list(range(1, EPOCHS + 1))


# ------------------------------------------------------------------------------- faults
@dataclass
class Context:
    """What a fault needs: the run, its folder, the random source, the simulated cluster."""

    run: Launch
    run_dir: Path
    rng: random.Random
    cluster: object | None = None
    nodes: dict = field(default_factory=dict)


def kill_one(ctx: Context, prefix: str) -> str:
    pids = ctx.run.tracker.find(prefix)
    if not pids:
        return f"no {prefix} process found"
    pid = ctx.rng.choice(pids)
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL {prefix} pid {pid} (of {len(pids)})"


def program(pid: int) -> str:
    """What ``pid`` runs: its process title or executable, or the script after a ``python`` (only that:
    the raylet's own arguments name the agents' command lines)."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    if len(argv) > 1 and Path(argv[0].split(" ")[0]).name.startswith("python"):
        scripts = [arg for arg in argv[1:] if arg.endswith(".py")]
        return scripts[0] if scripts else argv[0]
    return argv[0]


def kill_ray_process(ctx: Context, what: str, pattern: str) -> str:
    """SIGKILL the private Ray's process whose :func:`program` matches ``pattern`` (raylet, GCS, agent)."""
    ctx.run.tracker.poll()
    pids = sorted(pid for pid in ctx.run.tracker.alive() if re.search(pattern, program(pid)))
    if not pids:
        return f"no {what} process found"
    os.kill(pids[0], signal.SIGKILL)
    return f"SIGKILL {what} pid {pids[0]} (of {len(pids)})"


def remove_teacher_node(ctx: Context) -> str:
    """Remove the cluster node whose raylet hosts teacher 0 (the one with ``teacher_node``)."""
    hosting = None
    for label, node in ctx.nodes.items():
        raylet = node.all_processes["raylet"][0].process.pid
        if any(cmdline(pid).startswith("ray::TeacherActor") for pid in process_tree(raylet)):
            hosting = (label, node)
    if hosting is None:
        return "no node hosts teacher 0"
    ctx.cluster.remove_node(hosting[1], allow_graceful=False)
    return f"removed node {hosting[0]}"


def make_unwritable(ctx: Context) -> str:
    subprocess.run(["chmod", "-R", "a-w", str(ctx.run_dir)], check=True)
    return "chmod -R a-w RUN"


INJECT = {
    "driver_kill9": lambda ctx: (os.kill(ctx.run.proc.pid, signal.SIGKILL), "SIGKILL driver")[1],
    "driver_sigterm": lambda ctx: (os.kill(ctx.run.proc.pid, signal.SIGTERM), "SIGTERM driver")[1],
    "teacher_kill9": lambda ctx: kill_one(ctx, "ray::TeacherActor"),
    "agent_kill9": lambda ctx: kill_one(ctx, "ray::AgentBackend"),
    "learner_kill9": lambda ctx: kill_one(ctx, "ray::RayTrainWorker"),
    "redis_kill9": lambda ctx: kill_one(ctx, "/usr/bin/redis-server") if shutil.which("redis-server") else "",
    "raylet_kill9": lambda ctx: kill_ray_process(ctx, "raylet", r"/raylet/raylet$"),
    "gcs_kill9": lambda ctx: kill_ray_process(ctx, "gcs_server", r"/gcs/gcs_server$"),
    "dashboard_agent_kill9": lambda ctx: kill_ray_process(ctx, "dashboard agent",
                                                          r"^ray::DashboardAgent|/dashboard/agent\.py$"),
    "node_removal": remove_teacher_node,
    "unwritable": make_unwritable,
}


def start_cluster():
    """A head (4 CPUs) and two CPU-less nodes offering ``teacher_node`` (so only teacher 0 goes there)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 4, "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=0, resources={"teacher_node": 1}) for name in ("a", "b")}
    return cluster, nodes


# ------------------------------------------------------------------------------- trials
def reference(teacher_dirs: list[str], work: Path) -> dict:
    """The uninterrupted run every trial's student is compared with."""
    run_dir = work / "reference"
    shutil.rmtree(run_dir, ignore_errors=True)
    run = launch(["--address", "local", *overrides(teacher_dirs, run_dir)], work / "reference.log")
    started = time.time()
    code = wait(run)
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}): {run.last_line()}")
    return {"seconds": round(time.time() - started, 1), "state": student_state(run_dir),
            "left_over": left_over(run.tracker), "epochs_once": epochs_once(run_dir)}


def trial(fault: str, index: int, rng: random.Random, teacher_dirs: list[str], work: Path, ref: dict) -> dict:
    """One run with ``fault`` injected at a random step; resumed until it finishes (at most twice)."""
    run_dir = work / f"{fault}-{index}"
    subprocess.run(["chmod", "-R", "u+w", str(run_dir)], capture_output=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    # after epoch 1's checkpoint; before the last epoch's second step (steps.jsonl lags the learner a little)
    step = rng.randint(STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH * (EPOCHS - 1) + 2)
    delay = round(rng.uniform(0.0, 0.5), 3)
    cluster, nodes = start_cluster() if fault == "node_removal" else (None, {})
    address = cluster.address if cluster else "local"
    args = ["--address", address, *overrides(teacher_dirs, run_dir, on_cluster=cluster is not None)]
    prefix = ["setpriv", "--bounding-set=-dac_override", "--"] if fault == "unwritable" else []
    cluster_tracker = Tracker(os.getpid(), skip={os.getpid()}) if cluster else None
    record = {"fault": fault, "trial": index, "at_step": step, "delay_s": delay, "runs": []}
    started = time.time()
    runs = [launch(args, work / f"{fault}-{index}.0.log", prefix)]
    ctx = Context(runs[0], run_dir, rng, cluster, nodes)
    before: dict[str, int] = {}
    if wait_for_step(runs[0], run_dir, step):
        time.sleep(delay)
        before = valid_checkpoints(run_dir)
        record["injected"] = INJECT[fault](ctx)
    else:
        record["injected"] = "not injected: the run ended before the step"
    if fault == "unwritable":
        _wait_until(runs[0], UNWRITABLE_S)
        subprocess.run(["chmod", "-R", "u+w", str(run_dir)], check=True)
    wait(runs[0], RAY_FAULT_TIMEOUT_S if fault in RAY_FAULTS and was_injected(record) else RUN_TIMEOUT_S)
    lost = set(lost_checkpoints(before, run_dir))
    while runs[-1].returncode != 0 and len(runs) < 3:
        resumable = bool(valid_checkpoints(run_dir)) and (run_dir / "config.yaml").is_file()
        more = ["--resume", str(run_dir), "--address", address] if resumable else args
        runs.append(launch(more, work / f"{fault}-{index}.{len(runs)}.log"))
        wait(runs[-1])
        lost |= set(lost_checkpoints(before, run_dir))
    leftovers = [name for run in runs for name in left_over(run.tracker)]
    if cluster is not None:  # the run's actors on the cluster's nodes, then the cluster itself
        cluster_tracker.poll()
        leftovers += left_over(cluster_tracker, keep=lambda pid: not cmdline(pid).startswith("ray::")
                               or cmdline(pid).startswith(CLUSTER_OWN))
        cluster.shutdown()
        leftovers += left_over(cluster_tracker)
    finished = runs[-1].returncode == 0
    record.update({
        "seconds": round(time.time() - started, 1),
        "runs": [{"command": "resume" if "--resume" in r.args else "start", "exit": r.returncode,
                  "last_line": r.last_line(), **({"timed_out": True} if r.timed_out else {}),
                  **({"one_line": bool(ONE_LINE.match(r.last_line()))} if stopped(r.returncode, r.timed_out) else {})}
                 for r in runs],
        "finished": ("direct" if len(runs) == 1 else "resumed") if finished else "no",
        "identical": finished and identical(student_state(run_dir), ref["state"]),
        "epochs_once": epochs_once(run_dir),
        "left_over": leftovers,
        "checkpoints_before": len(before),
        "checkpoints_lost": sorted(lost),
    })
    return record


def _wait_until(run: Launch, seconds: float) -> None:
    """Poll the run for up to ``seconds`` or until it ends (it keeps running after)."""
    deadline = time.time() + seconds
    while run.proc.poll() is None and time.time() < deadline:
        run.tracker.poll()
        time.sleep(0.25)


# ------------------------------------------------------------------------------- report
def stopped(code: int | None, timed_out: bool | None) -> bool:
    """Whether a run stopped by itself, not done (exit 0) and not killed (by the fault or as hung)."""
    return code is not None and code > 0 and not timed_out


def one_line(run: dict) -> bool | None:
    """Whether a run's last stderr line is the one line (:data:`ONE_LINE`); None when that cannot be told
    (a line cut at 200 characters by an earlier version of this script that begins like one)."""
    if "one_line" in run:
        return run["one_line"]
    if len(run["last_line"]) == 200 and run["last_line"].startswith(("mtkd: error: ", "stopped ")):
        return None
    return bool(ONE_LINE.match(run["last_line"]))


def was_injected(trial: dict) -> bool:
    """Whether the trial's fault happened (its process was found, the run had not ended yet)."""
    return bool(trial["injected"]) and not trial["injected"].startswith(("not injected", "no "))


def summary_rows(trials: list[dict]) -> list[dict]:
    """One row per fault: counts over its trials."""
    rows = []
    for fault in dict.fromkeys(t["fault"] for t in trials):
        mine = [t for t in trials if t["fault"] == fault]
        n = len(mine)
        exits = sorted({"/".join("timeout" if r.get("timed_out") else str(r["exit"]) for r in t["runs"])
                        for t in mine})
        ended = [judged for t in mine for r in t["runs"] if stopped(r["exit"], r.get("timed_out"))
                 for judged in [one_line(r)] if judged is not None]
        rows.append({
            "fault": fault, "trials": n,
            "injected": f"{sum(map(was_injected, mine))}/{n}",
            "finished": f"{sum(t['finished'] != 'no' for t in mine)}/{n} "
                        f"({sum(t['finished'] == 'direct' for t in mine)} direct)",
            "identical": f"{sum(t['identical'] for t in mine)}/{n}",
            "epochs_once": f"{sum(t['epochs_once'] for t in mine)}/{n}",
            "left_over": sum(len(t["left_over"]) for t in mine),
            "checkpoints_lost": sum(len(t["checkpoints_lost"]) for t in mine),
            "exits": ", ".join(exits),
            "one_line": f"{sum(ended)}/{len(ended)}" if ended else "-",
        })
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["fault", "trials", "fault injected", "finished", "student bit-identical", "epochs once",
            "processes left", "checkpoints lost", "exit codes (start/resume)", "stopped with the one line"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['trials']} | {r['injected']} | {r['finished']} | {r['identical']} | "
                     f"{r['epochs_once']} | {r['left_over']} | {r['checkpoints_lost']} | {r['exits']} | "
                     f"{r.get('one_line', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the trials; write the JSON; print the table. Returns the results."""
    global RAY_FAULT_TIMEOUT_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", help=f"comma-separated, of {', '.join(FAULTS)} (default: all; --quick: "
                                         f"{', '.join(QUICK_FAULTS)})")
    parser.add_argument("--trials", type=int, default=3, help="trials per fault (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault moments and choices")
    parser.add_argument("--quick", action="store_true", help="1 trial per fault, 2 epochs of 4 steps")
    parser.add_argument("--work", default="/tmp/mtkd-faults", help="folder for teachers, runs and logs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults.json"), help="JSON results")
    parser.add_argument("--teachers", help="two teacher folders, comma-separated (default: trained into --work)")
    parser.add_argument("--table", metavar="JSON", help="only print the table of an earlier --out file")
    parser.add_argument("--ray-fault-timeout", type=float, default=RAY_FAULT_TIMEOUT_S, metavar="S",
                        help=f"a run still going S seconds after a raylet/GCS/agent kill is hung: killed, recorded as "
                             f"timeout (default {RAY_FAULT_TIMEOUT_S:g})")
    parser.add_argument("--merge", action="store_true", help="keep the other faults' trials of an existing --out "
                                                             "file; replace only those of the faults run")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(markdown(summary_rows(result["trials"])))
        return result
    chosen = args.faults or ",".join(QUICK_FAULTS if args.quick else FAULTS)
    faults = [f.strip() for f in chosen.split(",") if f.strip()]
    unknown = [f for f in faults if f not in INJECT]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; valid: {', '.join(FAULTS)}")
    trials_per_fault = 1 if args.quick else args.trials
    RAY_FAULT_TIMEOUT_S = args.ray_fault_timeout
    if args.quick:  # the smallest run with a checkpoint before the fault and an epoch after it
        global EPOCHS, STEPS_PER_EPOCH
        EPOCHS, STEPS_PER_EPOCH = 2, 4
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.time()
    teacher_dirs = args.teachers.split(",") if args.teachers else teachers(work)
    ref = reference(teacher_dirs, work)
    print(f"reference: {ref['seconds']} s, epochs once: {ref['epochs_once']}, left over: {ref['left_over']}",
          file=sys.stderr, flush=True)
    trials = []
    for fault in faults:
        for index in range(trials_per_fault):
            record = trial(fault, index, rng, teacher_dirs, work, ref)
            trials.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "runs"}), file=sys.stderr, flush=True)
            for run in record["runs"]:
                print(f"    {run['command']}: exit {run['exit']}: {run['last_line']}", file=sys.stderr, flush=True)
    rows = summary_rows(trials)
    result = {"command": " ".join([Path(sys.executable).name, "benchmarks/faults.py", *(argv or sys.argv[1:])]),
              "seed": args.seed, "trials_per_fault": trials_per_fault, "epochs": EPOCHS,
              "steps_per_epoch": STEPS_PER_EPOCH, "cpu": cpu_name(), "seconds": round(time.time() - started, 1),
              "reference": {k: v for k, v in ref.items() if k != "state"}, "summary": rows, "trials": trials}
    if args.out and args.merge and Path(args.out).is_file():
        result = merged(json.loads(Path(args.out).read_text()), result, faults)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows))
    return result


def merged(earlier: dict, new: dict, faults: list[str]) -> dict:
    """``earlier`` (an ``--out`` file) with its trials of ``faults`` replaced by ``new``'s, its summary
    recomputed, and ``new``'s settings recorded under ``merged`` (the other keys are ``earlier``'s)."""
    trials = [t for t in earlier["trials"] if t["fault"] not in faults] + new["trials"]
    runs = [r for r in earlier.get("merged", []) if not set(r["faults"]) <= set(faults)]
    runs.append({"faults": faults, **{k: v for k, v in new.items() if k not in ("summary", "trials")}})
    return {**earlier, "summary": summary_rows(trials), "trials": trials, "merged": runs}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
