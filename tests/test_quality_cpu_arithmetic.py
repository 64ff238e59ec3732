"""The quality harness refuses a bf16-mixed sweep on a CPU that emulates bf16 products, and records the CPU's kind."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality import cli  # noqa: E402
from quality import cpu_arithmetic as arithmetic  # noqa: E402
from quality.provenance import hardware  # noqa: E402

ZEN1 = {
    "vendor_id": "AuthenticAMD",
    "cpu family": "23",
    "model": "1",
    "model name": "AMD EPYC",
    "stepping": "2",
    "flags": "fpu sse sse2 avx f16c avx2 fma",
}
ZEN4 = {**ZEN1, "cpu family": "25", "model": "17", "flags": ZEN1["flags"] + " avx512f avx512_bf16 avx512_vnni"}


def test_the_cpu_record_tells_apart_machines_that_share_a_marketing_name():
    old, new = arithmetic.cpu_arithmetic(ZEN1), arithmetic.cpu_arithmetic(ZEN4)
    assert old["cpu_id"] == "AuthenticAMD family 23 model 1 stepping 2"
    assert new["cpu_id"] == "AuthenticAMD family 25 model 17 stepping 2"
    assert (old["native_bf16"], new["native_bf16"]) == (False, True)
    assert arithmetic.cpu_arithmetic({})["native_bf16"] is None  # no /proc/cpuinfo: unknown, not "no"
    assert old["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_every_run_records_the_cpu_arithmetic():
    record = hardware("cpu")
    assert {"cpu_id", "cpu_capability", "native_bf16"} <= set(record)


def test_an_emulated_bf16_cpu_is_refused_naming_the_slowdown_and_the_way_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU run is never refused
    with pytest.raises(SystemExit, match=r"takes 64x as long as a float32 one.*--allow-slow-bf16"):
        arithmetic.require_fast_bf16("bf16-mixed", slowdown=64.0)
    arithmetic.require_fast_bf16("bf16-mixed", slowdown=0.5)  # native: runs
    arithmetic.require_fast_bf16("bf16-mixed", allow_slow=True, slowdown=64.0)  # asked for: runs


def test_fp32_is_never_measured_or_refused(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("fp32 must not time bf16 products")

    monkeypatch.setattr(arithmetic, "bf16_slowdown", no_probe)
    arithmetic.require_fast_bf16("fp32")


def test_the_slowdown_probe_agrees_with_the_cpu_flags():
    """The guard decides by timing; where the flags say what this CPU is, the timing must say the same, or the guard
    would refuse a native-bf16 machine (or let an emulating one through)."""
    ratio = arithmetic.bf16_slowdown()
    assert math.isfinite(ratio) and ratio > 0
    native = arithmetic.cpu_arithmetic()["native_bf16"]
    if native is None:
        pytest.skip("no /proc/cpuinfo flags to compare the timing with")
    assert (ratio <= arithmetic.SLOWDOWN_LIMIT) == native, f"bf16/fp32 time ratio {ratio:.1f}, native_bf16={native}"


@pytest.mark.parametrize("command", [["run", "--suite", "smollm2-main"], ["base", "--suite", "smollm2-main"]])
def test_the_command_line_refuses_before_loading_anything(monkeypatch, command):
    monkeypatch.setattr(arithmetic, "bf16_slowdown", lambda *a, **k: 64.0)

    def no_work(*args, **kwargs):
        raise AssertionError("refused runs must not load a model")

    monkeypatch.setattr("quality.models.resolve_model", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CPU that multiplies bfloat16 natively"):
        cli.main(command)
    # --precision fp32 is not refused (it then loads the model: stopped here by the patch)
    with pytest.raises(AssertionError, match="must not load a model"):
        cli.main([*command, "--precision", "fp32"])


def test_measure_times_the_precision_it_is_given_without_the_bf16_refusal(monkeypatch, tmp_path):
    """On a CPU that emulates bf16, `measure --precision fp32` is how the float32 step time is taken (quality.md)."""
    monkeypatch.setattr(arithmetic, "bf16_slowdown", lambda *a, **k: 64.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("quality.data.load_splits", lambda task: None)
    timed = {}
    monkeypatch.setattr(
        "quality.timing.measure",
        lambda spec, task, splits, arms, settings, output: timed.update(
            precision=settings.precision, steps=settings.steps, arms=[arm.name for arm in arms]
        ),
    )
    command = ["measure", "--suite", "smollm2-main", "--arms", "lora", "--steps", "3", "--output", str(tmp_path / "t")]
    assert cli.main([*command, "--precision", "fp32"]) == 0
    assert timed == {"precision": "fp32", "steps": 3, "arms": ["lora"]}
    with pytest.raises(SystemExit, match="needs a CPU that multiplies bfloat16 natively"):
        cli.main(command)  # the suite's own bf16-mixed is still refused here
