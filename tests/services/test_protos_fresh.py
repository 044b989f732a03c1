"""The committed stubs in services/_generated/ match what scripts/gen_protos.py generates."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_under_the_services_package_only():
    code = ("import sys; import services._generated.mtkd.v1.teacher_pb2_grpc; "
            "bad = [m for m in sys.modules if m == 'mtkd.v1' or m.startswith('mtkd.v1.')]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
