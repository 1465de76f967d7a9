"""The benchmark scripts run: ``benchmarks/gpu.py`` (written for a CUDA machine) in its CPU dry
run, on GPT-2 small's 148 tensors shrunk 128 times: every row runs and is reported."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the GPU rows are torch's")
BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_the_gpu_benchmark_runs_every_row_in_its_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(BENCHMARKS / "gpu.py"), "--device", "cpu", "--scale", "128"]
    subprocess.run([*command, "--rounds", "1", "--steps", "1", "--json", str(out)], check=True, timeout=600)
    found = json.loads(out.read_text())
    assert found["failed"] == {}
    rows = {r["row"]: r for r in found["results"]}
    assert {
        "treeopt AdamW",
        "torch AdamW fused",
        "treeopt Muon (NS in bfloat16)",
        "torch.optim.Muon (NS in bfloat16)",
    } <= set(rows)
    assert {r["kind"] for r in rows.values()} == {"adamw", "muon", "routed"}
    assert all(r["ms"] > 0 and r["x_peer"] > 0 for r in rows.values())
