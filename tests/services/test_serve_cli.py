"""`mtkd serve-teacher` refuses nonsense at start-up: one line, exit code 2.

Every test runs the real command in a subprocess (``python -m services.cli``), as a user would.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from test_grpc_teacher import _self_signed_cert

from services._generated.mtkd.v1 import teacher_pb2, teacher_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``mtkd <args>`` to completion; one still running after ``timeout`` s is killed (returncode None)."""
    command = [sys.executable, "-m", "services.cli", *args]
    try:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # it served instead of refusing
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        return subprocess.CompletedProcess(command, None, "", f"still running after {timeout} s: {stderr}")


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and exactly one stderr line, ``mtkd: error: ...`` containing ``message``; no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("mtkd: error: "), result.stderr
    assert message in lines[0], lines[0]


def _pair(directory: Path) -> tuple[Path, Path]:
    directory.mkdir()
    return _self_signed_cert(directory)


# resnet8 teacher, [1, 28, 28] images: 3136 bytes each in float32.
REFUSALS = {
    "port-too-large": (["--port", "70000"], "--port 70000 is out of range; expected 0..65535 (0: any free port)"),
    "port-negative": (["--port", "-1"], "--port -1 is out of range"),
    "message-too-large": (["--max-message-mb", "100000"], "--max-message-mb 100000 is out of range; expected 1..2047"),
    "no-concurrency": (["--max-concurrent-rpcs", "0"], "--max-concurrent-rpcs 0; expected >= 1"),
    "batch-over-message": (["--max-batch", "100000"],
                           "--max-batch 100000 with --max-message-mb 16: max_batch is 100000; expected 1..5349"),
    "plaintext-on-all-interfaces": (["--host", "0.0.0.0"],
                                    "refusing to serve plaintext on --host 0.0.0.0, which is not a loopback address"),
    "half-tls": (["--tls-cert", "cert.pem"], "TLS needs both --tls-cert and --tls-key; got only --tls-cert"),
    "token-file": (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token: cannot read it"),
    "tls-key-of-another-cert": (["--tls-cert", "{a}/cert.pem", "--tls-key", "{b}/key.pem"],
                                "tls_key '{b}/key.pem' does not match the certificate in tls_cert '{a}/cert.pem'"),
    "tls-key-not-a-key": (["--tls-cert", "{a}/cert.pem", "--tls-key", "{a}/garbage.pem"], "cannot load the TLS pair"),
    "port-in-use": (["--port", "{taken}"], "--host 127.0.0.1 --port {taken}: Failed to bind 127.0.0.1:{taken}: "
                                           "the port is in use"),
}


@pytest.fixture(scope="module")
def refusals(teacher_dirs, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Every case of REFUSALS run once, a few at a time: ``{case: (result, expected message)}``."""
    root = tmp_path_factory.mktemp("tls")
    _pair(root / "a")
    _pair(root / "b")
    (root / "a" / "garbage.pem").write_text("not a key")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        names = dict(a=root / "a", b=root / "b", taken=taken.getsockname()[1])
        commands = {}
        for case, (args, message) in REFUSALS.items():
            args = [a.format(**names) for a in args]
            commands[case] = (["serve-teacher", teacher_dirs[0], *args], message.format(**names))
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(zip(commands, pool.map(lambda c: run_cli(c[0]), commands.values())))
    return {case: (results[case], commands[case][1]) for case in commands}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_serve_refuses_nonsense_in_one_line(refusals, case):
    assert_refused(*refusals[case])


@pytest.fixture(scope="module")
def checkpoint(teacher_dirs) -> str:
    return teacher_dirs[0]


def start(args: list[str], port_file: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``mtkd <args> --port 0 --port-file F``; return once the port is written."""
    server = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--port", "0", "--port-file", str(port_file)],
                              cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not port_file.is_file() and time.time() < deadline and server.poll() is None:
        time.sleep(0.1)
    if not port_file.is_file():
        server.kill()
        pytest.fail(f"server did not start: {server.communicate()[1]}")
    return server


@pytest.mark.parametrize("token, warning", [
    (None, "plaintext gRPC server on 0.0.0.0: anyone who can reach it can use it (no token), and all data cross "
           "the network unencrypted (no TLS)"),
    ("s3cret", "plaintext gRPC server on 0.0.0.0: the bearer token and all data cross the network unencrypted "
               "(use TLS)"),
], ids=["no-token", "token"])
def test_insecure_serves_plaintext_on_all_interfaces_with_the_right_warning(checkpoint, tmp_path, token, warning):
    env = {k: v for k, v in os.environ.items() if k != "MTKD_TOKEN"}
    if token:
        env["MTKD_TOKEN"] = token
    port_file = tmp_path / "port"
    server = start(["serve-teacher", checkpoint, "--host", "0.0.0.0", "--insecure"], port_file, env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            assert stub.Describe(teacher_pb2.DescribeTeacherRequest(), timeout=30, metadata=metadata).max_batch == 256
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert warning in stderr
    wrong = "without TLS: anyone who can reach it can use it"  # the old message, wrong when a token is set
    assert wrong not in stderr
