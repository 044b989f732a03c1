"""benchmarks/weighting.py: its regimes keep their promises (R2 leaves CE and confidence unchanged,
R1's mask is its groups', the mirror's KL and MSE are 0 in an engine step, the oracle gives
corrupted pairs no weight), its statistics are right, its runs are deterministic whatever the cache
holds, and its --quick mode runs end to end with the session's small teachers."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion, small_experiment

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("weighting_benchmark", REPO / "benchmarks" / "weighting.py")
wb = importlib.util.module_from_spec(SPEC)
sys.modules["weighting_benchmark"] = wb
SPEC.loader.exec_module(wb)

from mtkd.distill import StepInputs, feature_mse, kd_kl, per_sample_ce  # noqa: E402
from mtkd.engine import TransformInputs  # noqa: E402
from mtkd.models import Outputs  # noqa: E402

C = 10


def fake_teachers(batch: int, num_teachers: int, seed: int = 0) -> list[Outputs]:
    g = torch.Generator().manual_seed(seed)
    return [Outputs(torch.randn(batch, C, generator=g) * 3, torch.randn(batch, 8, generator=g),
                    torch.randn(batch, 8, 2, 2, generator=g)) for _ in range(num_teachers)]


def inputs_of(teachers: list[Outputs], targets: torch.Tensor, sample_index: torch.Tensor | None = None):
    dummy = Outputs(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    return TransformInputs(sample_index, targets, dummy, [], teachers)


# ------------------------------------------------------------------------------------- R2
@pytest.mark.parametrize("mode", ["permute", "reverse"])
def test_scramble_keeps_ce_confidence_and_the_two_fixed_logits(mode):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(512, C, generator=g) * 4
    targets = torch.randint(0, C, (512,), generator=g)
    keys = torch.rand(512, C, generator=g)
    out = wb.scramble_logits(logits, targets, mode, keys)
    top = logits.argmax(1)
    assert (top != targets).any() and (top == targets).any()  # both cases occur
    # exact: the argmax and the label's logits are the same bits; the row is the same multiset
    assert torch.equal(out.gather(1, top[:, None]), logits.gather(1, top[:, None]))
    assert torch.equal(out.gather(1, targets[:, None]), logits.gather(1, targets[:, None]))
    assert torch.equal(out.sort(1).values, logits.sort(1).values)
    assert torch.equal(out.argmax(1), top)
    # hence CE against the label, top probability and entropy are unchanged up to the rounding of
    # the (order-dependent) float32 sum inside logsumexp
    assert torch.allclose(per_sample_ce(out, targets), per_sample_ce(logits, targets), rtol=0, atol=1e-5)
    assert torch.allclose(out.softmax(1).max(1).values, logits.softmax(1).max(1).values, rtol=0, atol=1e-6)
    # ... in float64 the difference is float64 rounding, far below float32's
    assert torch.allclose(per_sample_ce(out.double(), targets), per_sample_ce(logits.double(), targets), rtol=0,
                          atol=1e-12)
    # and the dark knowledge did move: almost every row changed
    assert (out != logits).any(1).float().mean() > 0.99


def test_reverse_reverses_the_ranking_of_the_free_logits():
    logits = torch.tensor([[5.0, 1.0, 2.0, 3.0, 4.0, 0.0, -1.0, -2.0, -3.0, 9.0]])
    target = torch.tensor([0])  # argmax 9, label 0 stay; free values 1, 2, 3, 4, 0, -1, -2, -3 reversed in rank
    out = wb.scramble_logits(logits, target, "reverse")
    assert out.tolist() == [[5.0, 0.0, -1.0, -2.0, -3.0, 1.0, 2.0, 3.0, 4.0, 9.0]]


def test_r2_permutation_is_fixed_per_sample_and_seeded():
    teachers = fake_teachers(16, 3)
    targets = torch.randint(0, C, (16,), generator=torch.Generator().manual_seed(2))
    index = torch.arange(100, 116)
    regime = wb.make_regime("R2", C, 3, 7, 1000)
    a = regime(inputs_of(teachers, targets, index))
    # the same samples in another order in another batch: the same scramble per sample
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    b = regime(inputs_of([Outputs(*(t[perm] for t in o)) for o in teachers], targets[perm], index[perm]))
    assert torch.equal(a[0].logits[perm], b[0].logits)
    assert regime.mask[:, 0].all() and not regime.mask[:, 1:].any()
    assert a[1] is teachers[1] and a[0].feature is teachers[0].feature  # only teacher 0's logits change
    other_seed = wb.make_regime("R2", C, 3, 8, 1000)(inputs_of(teachers, targets, index))
    assert not torch.equal(other_seed[0].logits, a[0].logits)


def test_r2_variants_scramble_the_documented_teachers():
    teachers, targets = fake_teachers(8, 3), torch.arange(8) % C
    index = torch.arange(8)
    donor = wb.donor_index(targets)
    # name: (corrupted teachers, logits scrambled, features from the donor)
    expected = {"R2": ([0], True, False), "R2rev": ([0], True, False), "R2rev2": ([0, 1], True, False),
                "R2all": ([0, 1, 2], True, False), "R2feat": ([0], False, True), "R2full": ([0], True, True),
                "R2full2": ([0, 1], True, True)}
    assert set(expected) == {n for n in wb.REGIMES if n.startswith("R2")}
    for name, (corrupted, logits, features) in expected.items():
        regime = wb.make_regime(name, C, 3, 0, 8)
        out = regime(inputs_of(teachers, targets, index))
        assert regime.mask.all(0).nonzero()[:, 0].tolist() == corrupted, name
        assert not regime.mask[:, [m for m in range(3) if m not in corrupted]].any(), name
        changed = [m for m in range(3) if not torch.equal(out[m].logits, teachers[m].logits)]
        assert changed == (corrupted if logits else []), name
        for m in range(3):
            swapped = features and m in corrupted
            source = donor if swapped else torch.arange(8)
            assert torch.equal(out[m].feature, teachers[m].feature[source]), name
            assert torch.equal(out[m].embedding, teachers[m].embedding[source]), name
            ce_before, ce_after = per_sample_ce(teachers[m].logits, targets), per_sample_ce(out[m].logits, targets)
            assert torch.allclose(ce_after, ce_before, rtol=0, atol=1e-5), name
    assert wb.make_regime("R2", C, 3, 0, 8, r2_teacher=2).scrambled == (2,)
    assert wb.make_regime("R2full2", C, 2, 0, 8).scrambled == (0,)  # two teachers: one left clean


def test_transforms_do_not_write_into_the_cached_outputs():
    teachers = fake_teachers(12, 3)
    copies = [Outputs(*(t.clone() for t in o)) for o in teachers]
    targets = torch.arange(12) % C
    for name in ("R0", "R1", "R2", "R2rev", "R2all", "R2feat", "R2full2"):
        wb.make_regime(name, C, 3, 0, 12)(inputs_of(teachers, targets, torch.arange(12)))
    for before, after in zip(copies, teachers):
        assert all(torch.equal(x, y) for x, y in zip(before, after))


# ------------------------------------------------------------------------------------- R1
def test_specialist_groups_overlap_and_cover_every_class():
    assert wb.specialist_groups(10, 3) == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [0, 1, 7, 8, 9]]
    for classes, teachers in ((10, 2), (10, 3), (10, 4), (100, 3)):
        groups = wb.specialist_groups(classes, teachers)
        counts = [sum(c in g for g in groups) for c in range(classes)]
        assert min(counts) >= 1 and max(counts) >= 2, (classes, teachers)


def test_r1_mask_is_the_groups_and_corrupted_outputs_are_another_label_s():
    targets = torch.tensor([0, 0, 3, 5, 5, 5, 7, 9, 2, 2])
    teachers = fake_teachers(len(targets), 3)
    regime = wb.make_regime("R1", C, 3, 0, 100)
    out = regime(inputs_of(teachers, targets))
    for i, y in enumerate(targets.tolist()):
        for m, group in enumerate(regime.groups):
            assert bool(regime.mask[i, m]) == (y not in group)
    donor = wb.donor_index(targets)
    assert (targets[donor] != targets).all()
    assert donor.tolist()[:3] == [2, 2, 3]  # the next sample (cyclically) with another label
    for m in range(3):
        for i in range(len(targets)):
            source = donor[i] if regime.mask[i, m] else i
            for field in range(3):
                assert torch.equal(out[m][field][i], teachers[m][field][source])


def test_donor_of_a_one_label_batch_is_the_next_sample():
    assert wb.donor_index(torch.tensor([4, 4, 4])).tolist() == [1, 2, 0]


# --------------------------------------------------------------------------------- oracle
def test_oracle_is_uniform_over_the_clean_teachers_of_each_sample():
    regime = wb.make_regime("R0", C, 3, 0, 10)
    regime.mask = torch.tensor([[False, True, False], [True, True, False], [True, True, True]])
    w = wb.OracleWeights(regime).weights(StepInputs([torch.zeros(3, C)] * 3, torch.zeros(3, dtype=torch.long)))
    expected = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])  # none clean: all
    assert torch.allclose(w.logit, expected) and torch.equal(w.feature, w.logit)


# ----------------------------------------------------------------------------- statistics
def test_t_quantile_matches_the_table():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 19: 2.093, 29: 2.045,
             60: 2.000, 120: 1.980}
    for df, value in table.items():
        assert abs(wb.t_quantile_975(df) - value) < 1e-3, df


def test_paired_interval():
    d = wb.paired([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    half = 3.182 * statistics_sd([1, 2, 3, 4]) / 2
    assert math.isclose(d["mean"], 2.5) and abs(d["high"] - (2.5 + half)) < 1e-3 and abs(d["low"] - (2.5 - half)) < 1e-3
    assert wb.paired([1.0], [0.5])["low"] is None


def statistics_sd(values) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_summary_gap_share_and_aver_vs_r0():
    runs = []
    for seed, (r0_aver, aver, oracle, rl) in enumerate([(0.80, 0.70, 0.80, 0.75), (0.82, 0.72, 0.80, 0.77)]):
        base = {"seed": seed, "corrupted_weight": 0.2, "corrupted_weight_last_epoch": 0.1, "corrupted_fraction": 0.3,
                "teacher_weights": None, "num_teachers": 3, "wall_s": 1.0, "cpu_s": 1.0}
        runs += [{**base, "regime": "R0", "strategy": "aver", "test_acc": r0_aver},
                 {**base, "regime": "R1", "strategy": "aver", "test_acc": aver},
                 {**base, "regime": "R1", "strategy": "oracle", "test_acc": oracle},
                 {**base, "regime": "R1", "strategy": "mtkd_rl", "test_acc": rl}]
    summary = wb.summarise(runs, ["R0", "R1"], ["aver", "oracle", "mtkd_rl"])
    row = summary["R1"]["strategies"]["mtkd_rl"]
    assert math.isclose(row["vs_aver_pts"]["mean"], 5.0) and math.isclose(row["oracle_minus_aver_pts"], 9.0)
    assert math.isclose(row["gap_recovered"], 5 / 9)
    assert math.isclose(summary["R1"]["aver_vs_R0_aver_pts"]["mean"], -10.0)
    assert "aver_vs_R0_aver_pts" not in summary["R0"]


def test_update_replaces_the_rerun_rows_and_keeps_the_others():
    settings = {"epochs": 15, "labels": 1000, "test_images": "all", "student": "resnet8", "batch_size": 64,
                "config": "c", "r2_teacher": 0, "r1_group_size": None}
    teachers = [{"digest": "a"}, {"digest": "b"}]

    def row(strategy, seed, acc):
        return {"regime": "R1", "strategy": strategy, "seed": seed, "test_acc": acc}

    earlier = {"settings": {**settings, "regimes": ["R0", "R1"], "strategies": ["aver", "mtkd_rl:meta"],
                            "seeds": [0, 1], "note": "first run"},
               "teachers": teachers, "regimes": {"R0": {}, "R1": {}}, "checks": {}, "cache": [],
               "runs": [row("aver", 0, 0.7), row("aver", 1, 0.7), row("mtkd_rl:meta", 0, 0.1),
                        row("mtkd_rl:meta", 1, 0.1)]}
    report = {"settings": {**settings, "regimes": ["R1"], "strategies": ["mtkd_rl:meta"], "seeds": [0, 1]},
              "teachers": teachers, "regimes": {"R1": {}}, "checks": {}, "cache": [],
              "runs": [row("mtkd_rl:meta", 0, 0.8), row("mtkd_rl:meta", 1, 0.8)]}
    regimes, labels = wb.merge_into(report, earlier, "earlier.json", ["R1"], ["mtkd_rl:meta"])
    assert regimes == ["R0", "R1"] and labels == ["aver", "mtkd_rl:meta"]
    assert sorted((r["strategy"], r["seed"], r["test_acc"]) for r in report["runs"]) == [
        ("aver", 0, 0.7), ("aver", 1, 0.7), ("mtkd_rl:meta", 0, 0.8), ("mtkd_rl:meta", 1, 0.8)]
    assert report["settings"]["updates"][0] == {"note": "first run"}
    assert report["settings"]["updates"][1]["rows_replaced"] == 2

    other = {**report, "settings": {**report["settings"], "epochs": 2}, "runs": []}
    with pytest.raises(SystemExit, match="epochs"):
        wb.merge_into(other, earlier, "earlier.json", ["R1"], ["mtkd_rl:meta"])


# ------------------------------------------------------------------------ command line
def test_strategy_specs():
    specs = wb.parse_strategies("ce, aver,mtkd_rl:meta{agent.lr=3,agent.agent_step=10},mtkd_rl,oracle")
    assert [s.label for s in specs] == ["ce", "aver", "mtkd_rl:meta{agent.lr=3,agent.agent_step=10}", "mtkd_rl",
                                        "oracle"]
    rl = specs[2]
    assert rl.config_overrides() == ["distill.strategy=mtkd_rl", "agent.rule=meta", "agent.lr=3", "agent.agent_step=10"]
    assert specs[4].config_overrides() == ["distill.strategy=aver"] and specs[4].uses_teachers
    assert not specs[0].uses_teachers
    for bad in ("nosuch", "aver:reference", "mtkd_rl:meta{lr}", "aver,aver"):
        with pytest.raises(SystemExit):
            wb.parse_strategies(bad)


def test_an_unknown_agent_rule_is_a_clear_error_before_any_run():
    from mtkd.config import ExperimentConfig, to_dict

    base = json.loads(json.dumps(to_dict(ExperimentConfig())))
    with pytest.raises(SystemExit, match="nosuchrule"):
        wb.check_buildable(base, wb.parse_strategies("aver,mtkd_rl:nosuchrule"), [], 10)
    with pytest.raises(SystemExit, match="agent.nosuch"):
        wb.check_buildable(base, wb.parse_strategies("mtkd_rl{agent.nosuch=1}"), [], 10)
    wb.check_buildable(base, wb.parse_strategies("ce,aver,ebkd,camkd,mtkd_rl:reference,mtkd_rl:reinforce,oracle"),
                       ["agent.lr=3"], 10)


def test_tasks_group_runs_by_seed_and_run_ce_once():
    specs = wb.parse_strategies("ce,aver,oracle")
    tasks = wb.plan_tasks([0, 1, 2], ["R0", "R1"], specs, workers=2)
    assert [seed for seed, _ in tasks] == [0, 1, 2]
    assert [(r, s.label) for r, s in tasks[0][1]] == [("R0", "ce"), ("R0", "aver"), ("R1", "aver"), ("R0", "oracle"),
                                                      ("R1", "oracle")]
    split = wb.plan_tasks([0], ["R0", "R1"], specs, workers=2)  # fewer seeds than workers: the seed's runs split
    assert len(split) == 2 and sorted(len(runs) for _, runs in split) == [2, 3]


# ------------------------------------------------------------------ with real teachers
@pytest.fixture(scope="module")
def real(teacher_dirs, tmp_path_factory):
    """The session's two small teachers, a tiny student experiment and its seed-0 data."""
    from mtkd.config import to_dict
    from mtkd.experiment import load_data
    from mtkd.teachers import LocalTeacherPool, load_teacher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = small_experiment(tmp_path_factory.mktemp("weighting"), teacher_dirs,
                              ["distill.warmup_epochs=0", "data.train_subset=96", "data.test_subset=64",
                               "agent.agent_step=2"])
    base = json.loads(json.dumps(to_dict(config)))
    base["teachers"] = []
    pool = LocalTeacherPool([load_teacher(d, device="cpu", precision="fp32") for d in teacher_dirs])
    train, test = load_data(config.data, 0)
    yield base, pool, train, test
    torch.set_num_threads(threads)


OPTIONS = {"set": [], "device": "cpu", "threads": 1, "eval_every_epoch": False, "r2_teacher": 0, "r1_group_size": None}


@needs_fashion
def test_mirror_kl_and_mse_are_zero_in_an_engine_step(real):
    from mtkd.config import ExperimentConfig, apply_overrides, from_dict
    from mtkd.engine import Distiller
    from mtkd.experiment import train_loader
    from mtkd.teachers import TeacherPool

    base, pool, train, _ = real
    config = from_dict(ExperimentConfig, apply_overrides(json.loads(json.dumps(base)), ["distill.strategy=mtkd_rl"]))
    regime = wb.make_regime("R3", train.num_classes, 2, 0, len(train))
    seen = {}

    def spy(inputs):
        out = regime(inputs)
        seen["kl"] = kd_kl(inputs.student.logits, out[-1].logits, 4.0)
        seen["mse"] = feature_mse(inputs.projected[-1], out[-1].feature)
        seen["embedding"] = out[-1].embedding
        return out

    view = wb.CachedPool(wb.TeacherOutputCache(pool, 0), mirror=True)
    assert isinstance(view, TeacherPool)
    distiller = Distiller(config, view, train.num_classes, train.image_shape, device="cpu", teacher_transform=spy)
    assert distiller.teacher_names == ["resnet8", "vgg8", "mirror"]
    batch = next(iter(train_loader(train, config.data, 0)))
    result = distiller.step(batch.images, batch.labels, view.collect(batch), batch.sample_index)
    assert math.isfinite(result.loss) and len(result.weight_logit) == 3
    assert torch.equal(seen["kl"], torch.zeros_like(seen["kl"]))
    assert torch.equal(seen["mse"], torch.zeros_like(seen["mse"]))
    assert seen["embedding"].shape[1] == view.describe()[-1]["embedding_dim"]
    assert regime.mask[:, -1].all() and not regime.mask[:, :-1].any()


@needs_fashion
def test_runs_are_deterministic_whatever_the_cache_holds(real):
    base, pool, train, test = real
    aver, oracle, rl = wb.parse_strategies("aver,oracle,mtkd_rl")
    data = wb.SeedData(0, train, test)
    first = wb.run_one(base, aver, "R1", data, pool, OPTIONS)  # fills the cache
    assert data.cache.misses > 0 and data.cache.hits == 0
    wb.run_one(base, rl, "R3", data, pool, OPTIONS)
    again = wb.run_one(base, aver, "R1", data, pool, OPTIONS)  # every teacher output from the cache
    assert data.cache.hits > 0
    cold = wb.run_one(base, aver, "R1", wb.SeedData(0, train, test), pool, OPTIONS)
    for run in (again, cold):
        assert run["test_acc"] == first["test_acc"]
        assert [h["loss"] for h in run["history"]] == [h["loss"] for h in first["history"]]
    assert first["corrupted_weight"] == pytest.approx(0.5) and first["teacher_compute_s"] > 0
    best = wb.run_one(base, oracle, "R1", data, pool, OPTIONS)
    assert best["corrupted_weight"] == 0.0 and best["corrupted_weight_last_epoch"] == 0.0
    assert 0 < best["corrupted_fraction"] < 1


# ---------------------------------------------------------------------------- --quick
@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(960)
def test_quick_run_end_to_end(teacher_dirs, tmp_path):
    out, plot = tmp_path / "weighting.json", tmp_path / "weighting.png"
    result = subprocess.run([sys.executable, "benchmarks/weighting.py", "--quick", "--teachers", *teacher_dirs,
                             "--out", str(out), "--plot", str(plot)], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert json.loads(result.stdout)["out"] == str(out)
    assert plot.stat().st_size > 0
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["regimes"] == ["R0", "R1", "R3"] and settings["seeds"] == [0]
    strategies = settings["strategies"]
    assert "oracle" in strategies and "aver" in strategies and "ce" in strategies
    assert len(report["runs"]) == len(strategies) * 3
    for run in report["runs"]:
        assert 0 <= run["test_acc"] <= 1 and run["wall_s"] > 0
        if run["strategy"] == "ce":
            assert run["corrupted_weight"] is None
            continue
        assert run["num_teachers"] == (3 if run["regime"] == "R3" else 2)
        assert set(run["teacher_weights"]["logit"]) == ({"resnet8", "vgg8", "mirror"} if run["regime"] == "R3"
                                                        else {"resnet8", "vgg8"})
        if run["strategy"] == "aver":
            assert run["corrupted_weight"] == pytest.approx(1 / run["num_teachers"])
        if run["strategy"] == "oracle" and run["regime"] in ("R1", "R3"):
            assert run["corrupted_weight"] == 0.0
    ce = {r["regime"]: r["test_acc"] for r in report["runs"] if r["strategy"] == "ce"}
    assert len(set(ce.values())) == 1  # one ce run, reported in every regime
    for regime in ("R0", "R1", "R3"):
        rows = report["summary"][regime]["strategies"]
        assert set(rows) == set(strategies)
        assert rows["aver"]["vs_aver_pts"]["mean"] == 0.0 and rows["oracle"]["vs_oracle_pts"]["mean"] == 0.0
    assert "aver_vs_R0_aver_pts" in report["summary"]["R1"]
    assert report["regimes"]["R1"]["groups"] == [[0, 1, 2, 3, 4, 5], [0, 5, 6, 7, 8, 9]]
    assert report["cache_summary"]["max_bytes_per_process"] > 0
    # the regimes' promises, checked by the benchmark on a real batch with the real teachers
    checks = report["checks"]
    for name in ("R2", "R2rev", "R2rev2", "R2all", "R2feat", "R2full", "R2full2"):
        for row in checks[name]:
            assert row["argmax_and_label_logits_bitwise"] and row["same_values_sorted"] and row["argmax_kept"]
            assert row["ce_max_abs_diff"] <= 1e-5 and row["top_prob_max_abs_diff"] <= 1e-6
            scrambles = row["corrupted"] and name != "R2feat"
            swaps = row["corrupted"] and name in ("R2feat", "R2full", "R2full2")
            assert row["logits_changed_fraction"] == (1.0 if scrambles else 0.0), name
            assert row["features_changed_fraction"] == (1.0 if swaps else 0.0), name
            assert row["features_are_donors"] == swaps, name
    assert [row["corrupted"] for row in checks["R2"]] == [True, False]
    assert [row["corrupted"] for row in checks["R2all"]] == [True, True]
    assert checks["R1"]["mask_matches_groups"] and checks["R1"]["corrupted_outputs_are_donors"]
    assert checks["R1"]["covers_every_class"] and checks["R1"]["donor_labels_differ"]
    for key in ("R3_aver", "R3_oracle"):
        assert checks[key]["mirror_kl_max"] == 0.0 and checks[key]["mirror_mse_max"] == 0.0
    for key in ("R3_oracle", "R1_oracle", "R0_oracle"):
        assert checks[key]["max_corrupted_weight_where_clean_exists"] == 0.0 and checks[key]["feature_equals_logit"]
        assert checks[key]["rows_sum_to_1"] < 1e-6

    # --update: rerun one strategy in one regime and fold it into the report; the same seed gives the
    # same run, every other row is kept, and the report is replaced only once the merge is done
    result = subprocess.run([sys.executable, "benchmarks/weighting.py", "--quick", "--teachers", *teacher_dirs,
                             "--regimes", "R1", "--strategies", "aver", "--update", str(out), "--plot", str(plot)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    merged = json.loads(out.read_text())
    key = lambda r: (r["regime"], r["strategy"], r["seed"])  # noqa: E731
    assert sorted(map(key, merged["runs"])) == sorted(map(key, report["runs"]))
    before = {key(r): r["test_acc"] for r in report["runs"]}
    assert all(r["test_acc"] == before[key(r)] for r in merged["runs"])
    assert merged["settings"]["updates"][-1]["rows_replaced"] == 1
    assert merged["settings"]["strategies"] == strategies
    assert not (tmp_path / "weighting.partial.json").exists()
