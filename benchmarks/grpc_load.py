"""The gRPC teacher server under load, against the same teacher in process.

Serves one teacher with ``mtkd serve-teacher`` (a subprocess on loopback), then lets 1 and then
16 concurrent clients (threads, one channel each) send ``Infer`` requests of raw uint8 images
for a fixed time each, all outputs in float32. Measures the served images/s and the p50/p99
latency per request, and the in-process teacher's images/s on the same batches (normalising
included, as the server does), measured before and after the served runs (the faster is kept:
on a shared machine the load varies); and the bytes per image of a response on the wire (all
outputs or logits only, float32 or float16). A segmentation teacher (``--checkpoint`` of one
trained on canvases) serves its logit maps at its own stride; the images are its data set's test
canvases. Prints one JSON object.

    .venv/bin/python benchmarks/grpc_load.py                       # ~1 min, an untrained resnet20
    .venv/bin/python benchmarks/grpc_load.py --checkpoint DIR      # a trained teacher instead (segmentation too)
    .venv/bin/python benchmarks/grpc_load.py --quick               # a few seconds (CI)

Without ``--checkpoint`` an untrained zoo model is saved as a teacher checkpoint in a temporary
folder: its inference costs what a trained one costs. Both sides use ``--threads`` torch threads.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from mtkd.data import normalize
from mtkd.models import create_model
from mtkd.teachers import load_teacher, save_teacher
from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc, tensor_pb2

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST
FASHION_MEAN_STD = ((0.286,), (0.353,))


def untrained_teacher(folder: Path, model: str) -> Path:
    """Save an untrained zoo ``model`` (10 classes, [1, 28, 28] inputs) as a teacher checkpoint in ``folder``."""
    torch.manual_seed(0)
    network = create_model(model, num_classes=10, in_channels=1)
    meta = {"model": model, "num_classes": 10, "in_channels": 1, "input_shape": list(INPUT_SHAPE),
            "dataset": {"name": "fashion_mnist", "mean": list(FASHION_MEAN_STD[0]), "std": list(FASHION_MEAN_STD[1])}}
    save_teacher(folder, network.eval(), meta)
    return folder


def pixels(batch: int, meta: dict) -> np.ndarray:
    """``[batch, C, H, W]`` uint8 test images of the teacher's data set (its checkpoint's ``meta``):
    Fashion-MNIST, or garment canvases made with the options the teacher was trained on; noise of
    the teacher's input shape when neither is installed."""
    from mtkd.data import load_dataset

    dataset = meta.get("dataset") or {}
    try:
        if dataset.get("name") == "canvases":
            options = {k: v for k, v in (dataset.get("options") or {}).items() if k != "num_canvases"}
            test = load_dataset("canvases", None, "test", num_canvases=batch, **options)
        else:
            test = load_dataset("fashion_mnist", None, "test")
        images = test.images[:batch].numpy()
        if images.shape[1:] == tuple(meta["input_shape"]):
            return images
    except (FileNotFoundError, OSError):
        pass
    return np.random.default_rng(0).integers(0, 256, (batch, *meta["input_shape"]), dtype=np.uint8)


def wire_bytes_per_image(address: str, batch: np.ndarray) -> dict:
    """Serialised ``InferResponse`` bytes per image: all outputs and logits only, in float32 and
    with ``half_precision`` (float16)."""
    sizes = {}
    with grpc.insecure_channel(address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        for outputs, fields in (("all_outputs", []), ("logits_only", [teacher_pb2.OUTPUT_FIELD_LOGITS])):
            for dtype, half in (("float32", False), ("float16", True)):
                message = request(batch)
                message.fields.extend(fields)
                message.half_precision = half
                sizes[f"{outputs}_{dtype}"] = round(stub.Infer(message, timeout=60).ByteSize() / len(batch), 1)
    return sizes


def percentiles_ms(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 of latencies given in seconds, in milliseconds."""
    p50, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 99])
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}


def in_process(folder: Path, batch: np.ndarray, seconds: float) -> dict:
    """images/s and latency of ``teacher.infer(normalize(uint8 batch))`` in this process."""
    teacher = load_teacher(folder)
    info = teacher.describe()
    images = torch.from_numpy(batch.copy())
    teacher.infer(normalize(images, info["mean"], info["std"]))  # warm-up
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or not latencies:
        began = time.perf_counter()
        teacher.infer(normalize(images, info["mean"], info["std"]))
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    logits = teacher.infer(normalize(images, info["mean"], info["std"])).logits.numpy()
    return {"images_per_s": round(len(latencies) * len(batch) / elapsed, 1), "requests": len(latencies),
            **percentiles_ms(latencies), "logits": logits}


def start_server(folder: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    """``mtkd serve-teacher folder`` on a free loopback port, with ``threads`` torch threads."""
    port_file = Path(tempfile.mkdtemp()) / "port"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve-teacher", str(folder), "--port", "0", "--port-file",
         str(port_file), "--max-batch", str(max_batch)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not port_file.is_file() and server.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not port_file.is_file():
        server.kill()
        sys.exit(f"grpc_load: the server did not start: {server.communicate()[1]}")
    return server, f"127.0.0.1:{port_file.read_text()}"


def request(batch: np.ndarray) -> teacher_pb2.InferRequest:
    images = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=batch.shape, data=batch.tobytes())
    return teacher_pb2.InferRequest(images=images)


def decode_logits(reply: teacher_pb2.InferResponse) -> np.ndarray:
    return np.frombuffer(reply.logits.data, dtype="<f4").reshape(list(reply.logits.shape))


def load(address: str, batch: np.ndarray, clients: int, seconds: float) -> dict:
    """``clients`` threads, one channel each, send the batch until ``seconds`` have passed."""
    message = request(batch)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    ready = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            try:
                stub.Infer(message, timeout=60)  # connect and warm up, untimed
            except grpc.RpcError as err:
                failures.append(f"warm-up: {err.code().name}: {err.details()}")
                ready.abort()  # the others stop waiting too
                return
            try:
                ready.wait(timeout=180)
            except threading.BrokenBarrierError:
                return
            stop_at = time.perf_counter() + seconds
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                try:
                    reply = stub.Infer(message, timeout=60)
                except grpc.RpcError as err:
                    failures.append(err.code().name)
                    continue
                decode_logits(reply)
                np.frombuffer(reply.feature.data, dtype="<f4")
                latencies[index].append(time.perf_counter() - began)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=180)
    except threading.BrokenBarrierError:
        for worker in workers:
            worker.join()
        raise SystemExit(f"grpc_load: the clients could not start: {sorted(set(failures)) or 'timed out'}")
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    done = [x for per_client in latencies for x in per_client]
    return {"images_per_s": round(len(done) * len(batch) / elapsed, 1), "requests": len(done),
            **percentiles_ms(done), "failures": len(failures), "failure_codes": sorted(set(failures))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="teacher checkpoint folder (default: an untrained --model)")
    parser.add_argument("--model", default="resnet20", help="zoo model when no --checkpoint (default: resnet20)")
    parser.add_argument("--batch", type=int, default=64, help="images per request (default: 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default: 10)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="concurrent clients (default: 1 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and in process (default: 1)")
    parser.add_argument("--quick", action="store_true", help="resnet8, batch 16, 1 s per measurement (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.seconds = "resnet8", 16, 1.0
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.checkpoint) if args.checkpoint else untrained_teacher(Path(tmp) / args.model, args.model)
        meta = json.loads((folder / "meta.json").read_text())
        batch = pixels(args.batch, meta)
        local = in_process(folder, batch, args.seconds)
        server, address = start_server(folder, args.threads, max(args.batch, 1))
        try:
            with grpc.insecure_channel(address) as channel:
                first = teacher_pb2_grpc.TeacherServiceStub(channel).Infer(request(batch), timeout=60)
            served_diff = float(np.abs(decode_logits(first) - local.pop("logits")).max())
            wire = wire_bytes_per_image(address, batch)
            served = {str(n): load(address, batch, n, args.seconds) for n in args.clients}
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=60)
        again = in_process(folder, batch, args.seconds)  # the machine may be shared: keep the faster baseline
        again.pop("logits")
        local = max(local, again, key=lambda r: r["images_per_s"])
    report = {
        "model": meta["model"], "untrained": not args.checkpoint, "batch": args.batch,
        "input": f"uint8 [B, {', '.join(map(str, meta['input_shape']))}]",
        "outputs": "logits, embedding, feature (float32)", "logits_shape_per_image": list(first.logits.shape[1:]),
        "wire_bytes_per_image": wire, "torch_threads": args.threads,
        "seconds_per_measurement": args.seconds, "cpu_cores": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "in_process": local,
        "served": served,
        "ratio_to_in_process": {n: round(s["images_per_s"] / local["images_per_s"], 3) for n, s in served.items()},
        "max_abs_logit_difference_served_vs_in_process": served_diff,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
