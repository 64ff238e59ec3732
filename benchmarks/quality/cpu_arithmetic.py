"""Whether this CPU runs bfloat16 matrix products natively, and a guard for sweeps that need it.

The SmolLM2 suites run under bf16 autocast because, on a CPU with AVX-512 BF16 (or AMX), that made a training step
1.8x and scoring 2.9x faster than float32 (plan.md). A CPU without those instructions has no fast bf16 kernel:
torch falls back to a scalar dot product, and on the AVX2-only AMD EPYC of stop 25 a bf16 product of a SmolLM2
MLP's shapes (2560 x 576 by 576 x 1536) took 4,325 ms against 67 ms in float32, so a BoolQ training step that takes
7 s on the first kind of machine took about two minutes. Such a sweep would run for weeks and record the same runs
with other kernels; the command line refuses it before any work (``require_fast_bf16``), and every run records which
kind of machine it ran on (``cpu_arithmetic``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["NATIVE_BF16_FLAGS", "cpuinfo", "cpu_arithmetic", "bf16_slowdown", "require_fast_bf16", "SLOWDOWN_LIMIT"]

#: /proc/cpuinfo flags of x86 instructions that multiply bfloat16 matrices natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: A bf16 product this many times slower than float32 means no native kernel (native: about 0.5x; emulated: 64x).
SLOWDOWN_LIMIT = 3.0


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_arithmetic(fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Which CPU this is beyond its marketing name ("AMD EPYC" covers machines with and without bf16 instructions):
    family/model/stepping, the vector instructions torch dispatches to, and whether bf16 products are native (None
    where the flags cannot be read)."""
    info = cpuinfo() if fields is None else fields
    flags = set(info.get("flags", "").split())
    identity = " ".join(
        f"{label} {info[key]}" for key, label in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
        if key in info
    )  # fmt: skip
    return {
        "cpu_id": " ".join(part for part in (info.get("vendor_id", ""), identity) if part) or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(flags & set(NATIVE_BF16_FLAGS)) if flags else None,
    }


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times longer a bf16 matrix product takes than a float32 one here (best of ``repeats``)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up: kernel selection, allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def require_fast_bf16(precision: str, allow_slow: bool = False, slowdown: float | None = None) -> None:
    """Refuse a bf16-mixed CPU run where bf16 products are emulated (``allow_slow``: run anyway; ``slowdown``: a
    measured ratio, measured here when None)."""
    if precision != "bf16-mixed" or allow_slow or torch.cuda.is_available():
        return
    ratio = bf16_slowdown() if slowdown is None else slowdown
    if ratio <= SLOWDOWN_LIMIT:
        return
    arithmetic = cpu_arithmetic()
    native = " or ".join(NATIVE_BF16_FLAGS)
    raise SystemExit(
        f"quality.py: precision 'bf16-mixed' needs a CPU that multiplies bfloat16 natively ({native}); "
        f"on this one ({arithmetic['cpu_id'] or 'unknown CPU'}, torch dispatch {arithmetic['cpu_capability']}) a bf16 "
        f"matrix product takes {ratio:.0f}x as long as a float32 one, so the sweep would run that much slower, with "
        "other kernels than the runs already recorded. Run it on a machine with native bf16, or pass "
        "--allow-slow-bf16 to run here anyway (--precision fp32 starts runs that are not comparable with bf16 ones)."
    )
