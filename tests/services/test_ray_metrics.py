"""The Ray runtime's live metrics (``services/metrics.py``), read back from a real run: the private Ray
that ``mtkd distill`` starts serves them, through its metrics agent, in Prometheus text on
``runtime.metrics_export_port``; the test scrapes that endpoint while the run goes on."""
from __future__ import annotations

import re
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from services.metrics import AGENT_UPDATE, CACHE_HIT_RATE, CACHE_LOOKUPS, IN_FLIGHT, METRICS, TEACHER_LATENCY, \
    TEACHER_WAIT, exported_names

from conftest import needs_fashion, small_experiment

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def test_every_metric_is_in_the_docs_table():
    doc = (REPO / "docs" / "distributed.md").read_text()
    for metric in METRICS:
        tags = ", ".join(f"`{t}`" for t in metric.tags) or "-"
        assert f"| `{metric.name}` | {metric.kind} | {tags} | {metric.unit} |" in doc, metric.name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> ``{(name, labels): value}``."""
    values = {}
    for line in text.splitlines():
        match = LINE.match(line.strip())
        if match and not line.startswith("#"):
            labels = frozenset(LABEL.findall(match.group(2) or ""))
            values[(match.group(1), labels)] = float(match.group(3))
    return values


def scraped(seen: dict, name: str, **labels: str) -> float:
    """The largest value of ``name`` with ``labels`` among everything scraped (0 if never seen)."""
    found = [v for (n, ls), v in seen.items() if n == name and set(labels.items()) <= set(ls)]
    return max(found, default=0.0)


@needs_fashion
@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_run_exports_teacher_latency_learner_wait_and_agent_updates(tmp_path, teacher_dirs, monkeypatch):
    # each process sends its metrics to the agent every second (Ray's default: every 10 s)
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    port = free_port()
    config = small_experiment(tmp_path, teacher_dirs, [
        "runtime.runtime=ray", "runtime.address=local", f"runtime.metrics_export_port={port}", "cache.url=local",
        "data.train_subset=256"])
    seen: dict = {}
    stop = threading.Event()

    def scrape() -> None:  # every half second while the run goes on (the private Ray ends with it)
        while not stop.wait(0.5):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                    text = reply.read().decode()
            except OSError:
                continue  # not started yet, or gone
            for key, value in parse(text).items():
                seen[key] = max(value, seen.get(key, value))

    from services.learner.driver import run_ray

    watcher = threading.Thread(target=scrape, daemon=True)
    watcher.start()
    try:
        summary = run_ray(config, progress=False)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert summary["epochs"] == 2
    latency_count, latency_sum = exported_names(TEACHER_LATENCY)[1:]
    for teacher in ("resnet8", "vgg8"):  # both teachers answered, and took time doing it
        assert scraped(seen, latency_count, teacher=teacher) > 0, sorted({n for n, _ in seen if "mtkd" in n})
        assert scraped(seen, latency_sum, teacher=teacher) > 0
    wait_count, wait_sum = exported_names(TEACHER_WAIT)[1:]
    assert scraped(seen, wait_count) > 0 and scraped(seen, wait_sum) > 0
    assert scraped(seen, exported_names(AGENT_UPDATE)[1], rule="reference") > 0
    assert scraped(seen, exported_names(CACHE_LOOKUPS)[0], teacher="resnet8") > 0
    names = {name for name, _ in seen}  # gauges: the value at each export (the hit rate of a first run is 0)
    assert exported_names(IN_FLIGHT)[0] in names and exported_names(CACHE_HIT_RATE)[0] in names
