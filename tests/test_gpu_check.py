"""The GPU check (benchmarks/gpu_check.py, gpu_check.sh, gpu_prepare.sh) kept runnable without a GPU: its smoke mode on
CPU prints the table with a row per method and finite positive ratios, the CUDA-only sections say so, the QLoRA path
and accelerate child run on CPU, and the preparation script's upload-size check and bitsandbytes trimming work.

A borrowed GPU is minutes long: what can break without one must break here first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "benchmarks" / "gpu_check.py"
PREPARE = REPO / "benchmarks" / "gpu_prepare.sh"
METHODS = ("LoRA", "MoLA", "MoLEx", "MoD", "DLO")


def _run(args: list[str], timeout: int = 180, **env: str) -> subprocess.CompletedProcess:
    # one thread: the tiny models' matmuls only lose to a second thread on a shared machine
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(args, capture_output=True, text=True, env=environment, cwd=REPO, timeout=timeout)


def _table(markdown: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the first markdown table whose header row starts with ``header_start``, as dicts."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def _positive_finite(cell: str) -> bool:
    try:
        value = float(cell)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


def test_smoke_run_prints_a_row_per_method_with_finite_positive_ratios(tmp_path):
    output = tmp_path / "gpu_check.md"
    # --budget-scale: the time boxes are sized for a quiet machine; a shared CI core must not cut the smoke run short
    run = _run(
        [sys.executable, str(CHECK), "--device", "cpu", "--tiny", "--budget-scale", "4", "--output", str(output)]
    )
    assert run.returncode == 0, run.stderr[-4000:]
    markdown = output.read_text()
    assert markdown in run.stdout  # printed as written
    assert "**Hardware**: CPU" in markdown and "transformers 5." in markdown and "peft-depth" in markdown
    rows = _table(markdown, "| method (config)")
    for method in METHODS:
        method_rows = [row for row in rows if row["method (config)"].split()[0] == method]
        assert method_rows, f"no row for {method} in\n{markdown}"
        for row in method_rows:
            for column in ("step × ref", "memory × ref", "decode × ref", "step (ms)", "decode (ms/token)"):
                assert _positive_finite(row[column]), (method, column, row)
    sections = {row["section"]: row["status"] for row in _table(markdown, "| section")}
    assert sections["train tiny"] == "ok" and sections["decode tiny"] == "ok"
    assert sections["qlora"] == "skipped: needs CUDA"
    assert sections["fsdp2"] == "skipped: needs CUDA"


def test_qlora_path_runs_on_a_cpu_4bit_base(tmp_path):
    # bitsandbytes >= 0.50 quantizes on CPU: the GPU run's QLoRA code is exercised here first
    pytest.importorskip("bitsandbytes")
    output = tmp_path / "qlora.md"
    run = _run(
        [sys.executable, str(CHECK), "--device", "cpu", "--tiny", "--sections", "qlora", "--qlora-on-cpu"]
        + ["--budget-scale", "4", "--output", str(output)]
    )
    assert run.returncode == 0, run.stderr[-4000:]
    markdown = output.read_text()
    rows = _table(markdown, "| shape | method")
    assert {row["method"].split()[0] for row in rows} == set(METHODS)
    for row in rows:
        assert _positive_finite(row["step × ref"]) and _positive_finite(row["memory × ref"]), row
    assert _table(markdown, "| section")[0]["status"] == "ok"


def test_accelerate_child_trains_saves_and_reloads_every_method_on_cpu():
    # what `accelerate launch --config_file examples/accelerate_fsdp2.yaml` runs on the GPU, here unlaunched: one CPU
    # process, so nothing is sharded (accelerate turns FSDP on only for accelerator devices)
    run = _run([sys.executable, str(CHECK), "--fsdp-child", "--device", "cpu", "--tiny"])
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("FSDP_RESULT ")]
    assert [row["variant"] for row in rows] == ["lora", "lora_qv", "mola", "molex_vote", "mod", "dlo"]
    for row in rows:
        assert row["ok"], row
        assert row["reload_max_diff"] == 0.0 and row["loss_finite"] and row["dtensor"] is False


def test_the_scripts_parse():
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)


def _tree_mib() -> float:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        cwd=REPO,
    ).stdout.split(b"\0")
    total = 0
    for path in {p for p in listed if p}:
        with_repo = REPO / os.fsdecode(path)
        if os.path.lexists(with_repo):
            total += os.lstat(with_repo).st_size
    return total / 2**20


def test_prepare_counts_the_upload_against_the_64_mib_limit(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with open(wheels / "big.whl", "wb") as handle:  # sparse: its size counts, no disk is used
        handle.truncate(10 * 2**20)
    fits = _run(["bash", str(PREPARE), "--check-size"], GPU_WHEELS_DIR=str(wheels), PYTHON=sys.executable)
    assert fits.returncode == 0, fits.stderr
    total = float(fits.stdout.split("upload total: ")[1].split(" MiB")[0])
    assert total == pytest.approx(10 + _tree_mib(), abs=0.05)  # files added meanwhile by others: small
    with open(wheels / "big.whl", "wb") as handle:
        handle.truncate(64 * 2**20)
    too_big = _run(["bash", str(PREPARE), "--check-size"], GPU_WHEELS_DIR=str(wheels), PYTHON=sys.executable)
    assert too_big.returncode == 1
    assert "over the 64 MiB limit" in too_big.stderr


def test_prepare_keeps_only_the_chosen_cuda_library_of_bitsandbytes(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    libraries = ["cpu", "cuda118", "cuda128", "cuda130", "rocm72", "xpu2026"]
    files = {f"bitsandbytes/libbitsandbytes_{name}.so": b"\0" * 100 for name in libraries}
    files["bitsandbytes/__init__.py"] = b"__version__ = '0.50.2'\n"
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    files["bitsandbytes-0.50.2.dist-info/RECORD"] = (record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n").encode()
    wheel = "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(source / wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    result = _run(["bash", str(PREPARE), "--trim-bnb", str(source), str(out), "130"], PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    names = set(zipfile.ZipFile(out / wheel).namelist())
    assert names == {
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes-0.50.2.dist-info/RECORD",
    }
    record = zipfile.ZipFile(out / wheel).read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {line.split(",")[0] for line in record.splitlines()} == names  # RECORD lists what the wheel holds
    missing = _run(["bash", str(PREPARE), "--trim-bnb", str(source), str(out), "129"], PYTHON=sys.executable)
    assert missing.returncode != 0 and "libbitsandbytes_cuda129.so" in missing.stderr
