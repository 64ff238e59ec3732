"""Where and with what a run was made: hardware, library versions, git commit (and whether the source was edited)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .cpu_arithmetic import cpu_arithmetic, cpuinfo

__all__ = ["hardware", "device_kind", "model_device", "versions", "git_state"]

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "peft-depth", "lm_eval")


def _cpu_model() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def device_kind(device: torch.device | str) -> str:
    """ "gpu" for a CUDA device, "cpu" for the CPU: the kind of device a comparison must not mix."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are, hence where its forward runs."""
    return next(model.parameters()).device


def hardware(device: torch.device | str) -> dict[str, Any]:
    """CPU model, cores and torch threads, and the GPU's name when ``device`` (where the run computed: pass the model's
    own device, not whether a GPU exists) is one; comparisons never mix the two kinds."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info.update(cpu_arithmetic())  # "AMD EPYC" alone names machines with and without native bf16 products
    info["device"] = device_kind(device)
    if info["device"] == "gpu":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


@functools.cache
def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


_pinned: dict[str, Any] | None = None


def pin_git_state(state: dict[str, Any]) -> None:
    """Make ``git_state`` return ``state``: a run's child process (``isolation``) reports the sweep's commit, whose
    code snapshot it runs, not what the working tree holds by then."""
    global _pinned
    _pinned = dict(state)
    git_state.cache_clear()


@functools.cache
def git_state() -> dict[str, Any]:
    """HEAD's commit and whether ``src/`` or the harness differs from it (then the run's code is not exactly that
    commit), read once per process: a sweep runs the code it imported at its start, so a commit made while it runs
    must not be credited with its later runs (``run_suite`` reads this before its first run)."""
    if _pinned is not None:
        return dict(_pinned)
    return {
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_src_dirty": bool(_git("status", "--porcelain", "src", "benchmarks/quality")),
    }
