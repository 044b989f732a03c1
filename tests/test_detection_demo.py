"""The detection demo and benchmark: the picture of detections, the demo config (its teachers are the
benchmark's, so both share the teacher cache), the benchmark's paired statistics, and the detection
demo end to end on a few tiny canvases."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"c{k}" for k in range(10)]


def _benchmark():
    """benchmarks/detection.py as a module (it puts benchmarks/ on sys.path for its own imports)."""
    spec = importlib.util.spec_from_file_location("det_benchmark", REPO / "benchmarks" / "detection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("det_benchmark", module)
    spec.loader.exec_module(module)
    return module


def test_plot_detection_examples_draws_ground_truth_and_decoded_detections(tmp_path):
    from mtkd.detection.decode import decode_centernet
    from mtkd.plot import plot_detection_examples

    torch.manual_seed(0)
    targets = torch.full((3, 4, 5), -1.0)
    targets[:, 0] = torch.tensor([2.0, 4, 6, 20, 30])
    targets[1, 1] = torch.tensor([7.0, 10, 2, 31, 12])
    logits = torch.randn(3, 14, 8, 8)
    logits[:, 10:12] = 3.0  # box sizes of 3 cells
    detections = decode_centernet(logits, 4, (32, 32), top_k=5)
    path = tmp_path / "detections.png"
    plot_detection_examples(torch.rand(3, 32, 32), targets, {"teacher": detections, "student ce": detections},
                            CLASSES, path, title="t", min_score=0.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match=r"targets \[N, G, 5\]"):
        plot_detection_examples(torch.rand(3, 32, 32), targets[:2], {}, CLASSES, tmp_path / "bad.png")


def test_demo_detection_config_loads_and_trains_the_benchmarks_teachers():
    from mtkd.config import from_dict, read_yaml
    from services.demo import DemoConfig, teacher_key

    demo = from_dict(DemoConfig, read_yaml(REPO / "configs" / "demo-detection.yaml"))
    assert demo.student.data.detection and demo.student.runtime.runtime == "inprocess"
    bench = _benchmark()
    assert demo.teacher_models == list(bench.TEACHERS)
    for model in demo.teacher_models:  # the same cache key: the demo reuses the benchmark's teachers
        demo.teacher.model = model
        assert teacher_key(demo.teacher) == teacher_key(bench.teacher_config(model, bench.DATA, bench.TEACHER_OPTIM))
    assert demo.student.student == bench.STUDENT["student"]
    assert demo.student.optim.epochs == bench.STUDENT["optim"]["epochs"]


def test_benchmark_summary_pairs_seeds_per_object_against_per_image():
    bench = _benchmark()
    maps = {"ce": [0.20, 0.22, 0.18], "aver": [0.25, 0.26, 0.24], "camkd@object": [0.26, 0.25, 0.27],
            "camkd": [0.24, 0.26, 0.25]}
    records = [{"seed": s, "strategy": label, "test_map": v, "test_map50": v * 2, "weights": {}}
               for label, values in maps.items() for s, v in enumerate(values)]
    summary = bench.summarise(records, list(maps))
    assert summary["aver"]["test_map"] == pytest.approx(25.0)
    gain = summary["aver"]["vs_ce/test_map"]  # differences 5, 4, 6 points: mean 5, sd 1, t(2) = 4.303
    assert gain["mean"] == pytest.approx(5.0)
    assert gain["high"] - gain["mean"] == pytest.approx(4.303 / 3 ** 0.5, rel=1e-3)
    assert summary["camkd@object"]["vs_per_image/test_map"]["mean"] == pytest.approx(1.0)
    assert "vs_per_image/test_map" not in summary["camkd"]
    assert summary["aver"]["vs_ce/test_map50"]["mean"] == pytest.approx(10.0)
    assert bench.parse_strategy("mtkd_rl@object") == ("mtkd_rl", "object")
    assert "| camkd@object | 3 | 26.00 | 52.00 |" in bench.table(summary)


@needs_fashion  # about 6 s on 2 quiet cores (21 s with a load average of 20): 2 tiny trainings, 3 plots
def test_detection_demo_end_to_end_prints_both_tables_and_draws_the_detections(tmp_path, capsys, one_torch_thread):
    """`mtkd demo` on a detection config, a few tiny canvases: teachers trained into the cache, then
    `ce` and per-object `mtkd_rl` students of one teacher in process (asked for Ray: a detection demo keeps its
    config's runtime), the mAP and mAP@0.5 tables, the picture of detections and the class-trust plot
    (its last row: background units)."""
    from services.demo import run_demo

    data = (f"{{name: canvases_det, batch_size: 8, eval_batch_size: 16, options: {{size: 32, "
            f"num_canvases: {{train: 24, test: 16}}, cache_dir: {tmp_path / 'canvases'}}}}}")
    overrides = [f"cache_dir={tmp_path / 'teachers'}", f"output_dir={tmp_path / 'demo'}",
                 "strategies=[ce, mtkd_rl@object]", "teacher_models=[centernet_resnet8]",
                 f"teacher.data={data}", "teacher.optim={epochs: 1, lr: 0.05}",
                 f"student.data={data}", "student.optim={epochs: 1, lr: 0.05}", "student.agent.agent_step=2"]
    summary = run_demo(str(REPO / "configs" / "demo-detection.yaml"), overrides, runtime="ray")
    out = capsys.readouterr().out
    assert "test mAP" in out and "mAP@0.5" in out and "mtkd_rl@object" in out
    assert [(row["role"], row["strategy"]) for row in summary["table"]] == [
        ("teacher", "-"), ("student", "ce"), ("student", "mtkd_rl@object")]
    assert all(0.0 <= row["test_map"] <= row["test_map50"] <= 1.0 for row in summary["table"])
    for plot in ("detections", "comparison", "class_trust"):
        assert Path(summary[f"{plot}_plot"]).stat().st_size > 1000
    assert (tmp_path / "demo" / "mtkd_rl@object" / "metrics.jsonl").exists()
