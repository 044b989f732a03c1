"""Devices and precision: resolving a device, reduced-precision teachers and students on the CPU (what
CI runs), and the same engine on CUDA where a GPU is present."""
from __future__ import annotations

import math

import pytest
import torch

from mtkd.config import ConfigError, ExperimentConfig, load_config
from mtkd.devices import DeviceError, autocast, resolve_device, resolve_precision, runs_natively
from mtkd.engine import Distiller, as_float_outputs
from mtkd.models import create_model
from mtkd.teachers import LocalTeacherPool, Teacher

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_teacher(name: str, precision: str = "fp32", device: str = "cpu") -> Teacher:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1)
    meta = {"model": name, "num_classes": 10, "in_channels": 1, "input_shape": [1, 28, 28], "weights_digest": name}
    return Teacher(model, meta, device=device, precision=precision)


def experiment(overrides: list[str]) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, ["student=resnet8", "data.batch_size=16", "runtime.runtime=inprocess",
                                                "agent.agent_step=2", "distill.warmup_epochs=0", *overrides])


def test_device_names_resolve_or_fail_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        load_config(ExperimentConfig, None, ["runtime.device=tpu"])
    with pytest.raises(ConfigError, match="runtime.student_precision: unknown value 'fp16'"):
        load_config(ExperimentConfig, None, ["runtime.student_precision=fp16"])


def test_precision_resolution_and_autocast_contexts():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    with autocast(cpu, "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert runs_natively("cpu", "fp32")


@pytest.mark.parametrize("name", ["resnet8", "vgg8"])
def test_bf16_teacher_gives_bf16_raw_outputs_close_to_fp32(name):
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    exact, fast = random_teacher(name, "fp32"), random_teacher(name, "bf16")
    raw = fast.infer_raw(images)
    assert {t.dtype for t in raw} == {torch.bfloat16}
    assert raw.feature.is_contiguous(memory_format=torch.channels_last) or raw.feature.shape[-1] == 1
    reference = exact.infer(images)
    floats = fast.infer(images)
    assert {t.dtype for t in floats} == {torch.float32}
    # bf16 keeps 8 bits of mantissa: logits agree to about 1% of their scale
    scale = reference.logits.abs().max()
    assert (floats.logits - reference.logits).abs().max() <= 0.05 * scale
    assert exact.describe()["numerics"].startswith("cpu-fp32") and fast.describe()["precision"] == "bf16"


@pytest.mark.parametrize("overrides", [["runtime.student_precision=bf16"], ["runtime.teacher_precision=bf16"]],
                         ids=["bf16-student", "bf16-teachers"])
def test_reduced_precision_steps_train_with_fp32_losses_and_weights(overrides):
    config = experiment(["distill.strategy=mtkd_rl", *overrides])
    precision = "bf16" if "teacher" in overrides[0] else "fp32"
    pool = LocalTeacherPool([random_teacher("resnet8", precision), random_teacher("vgg8", precision)])
    distiller = Distiller(config, pool, 10, (1, 28, 28), device="cpu")
    generator = torch.Generator().manual_seed(2)
    images, labels = torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    before = [p.detach().clone() for p in distiller.module.parameters()]
    for _ in range(3):
        outputs = [as_float_outputs(o, distiller.device) for o in pool.collect(pool.submit(_batch(images, labels)))]
        result = distiller.step(images, labels, outputs)
        assert all(math.isfinite(v) for v in (result.loss, result.ce, result.kd, result.feature))
    assert all(p.dtype == torch.float32 for p in distiller.module.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.module.parameters()))
    assert distiller.strategy.agent.version >= 1  # the agent learnt from the bf16 step's state


def _batch(images, labels):
    from mtkd.data import Batch

    return Batch(0, images, labels, torch.arange(len(labels)))


@needs_cuda
def test_the_engine_trains_on_cuda_with_teachers_on_the_gpu():
    config = experiment(["distill.strategy=mtkd_rl", "runtime.device=cuda", "runtime.teacher_precision=auto"])
    pool = LocalTeacherPool([random_teacher("resnet8", "auto", "cuda"), random_teacher("vgg8", "auto", "cuda")])
    distiller = Distiller(config, pool, 10, (1, 28, 28))
    assert distiller.device.type == "cuda" and next(distiller.module.parameters()).is_cuda
    images = torch.randn(16, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 10, (16,), device="cuda")
    outputs = [as_float_outputs(o, distiller.device) for o in pool.collect(pool.submit(_batch(images, labels)))]
    assert all(t.is_cuda and t.dtype == torch.float32 for o in outputs for t in o)
    result = distiller.step(images, labels, outputs)
    assert math.isfinite(result.loss)
