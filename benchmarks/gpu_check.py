"""GPU check: each method against plain peft LoRA on one borrowed GPU, in a few minutes, nothing downloaded.

For random-weight models in SmolLM2-135M's and Llama-3.2-1B's shapes (configs built here, no Hub), in bf16:

- **training step**: forward + LM loss + ``peft_depth.aux_losses`` + backward + AdamW step under bf16 autocast, every
  variant interleaved repeat by repeat (``common.interleaved_timings``), ratio = median of the per-repeat ratios to
  the reference LoRA (``common.paired_ratio``); an A/A line (LoRA against a second copy of itself) shows the noise;
- **peak memory** of a variant's training: on CUDA, ``torch.cuda.max_memory_allocated`` over building it (its own copy
  of the base) and its first two steps, minus what was allocated before (so the AdamW state, gradients and
  activations are in, the other variants are not); on CPU (smoke mode) only the resident weights, gradients and AdamW
  state, counted;
- **batch-1 decode**: ``generate`` with the KV cache, 16-token prompt, greedy, a fixed number of new tokens;
- **QLoRA**: the base quantized to NF4 (``BitsAndBytesConfig``, double quantization, bf16 compute) from a checkpoint
  saved here, ``prepare_model_for_kbit_training``, then one timed step per method after one warm-up, and its peak;
- **accelerate FSDP2** at world size 1: ``accelerate launch --config_file examples/accelerate_fsdp2.yaml`` runs this
  file's ``--fsdp-child``, which prepares each method with accelerate (FSDP2 wrapping, bf16 mixed precision), steps
  it, checks the trainable parameters are DTensors, gathers the adapter, saves it and reloads it.

The variants are the existing benchmarks' configs (``bench_mola.build`` etc.): LoRA r=8 on the seven projections as
the reference of MoLA, MoD and DLO; LoRA r=8 on q/v (peft's default, the paper's setting) as MoLEx's.

Every section runs under a time box and on its own: one that fails or overruns prints why, and the rest still run.
The output is markdown to paste into BENCHMARKS.md, headed by the hardware and versions.

    python benchmarks/gpu_check.py                          # on a CUDA machine (benchmarks/gpu_check.sh sets it up)
    python benchmarks/gpu_check.py --device cpu --tiny      # CPU smoke run: tiny shapes; QLoRA and FSDP2 skipped
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # common and the per-method benchmarks, as when they run as scripts

import bench_dlo  # noqa: E402
import bench_mod  # noqa: E402
import bench_mola  # noqa: E402
import bench_molex  # noqa: E402
import torch  # noqa: E402
from common import SMOLLM2_SHAPE, TINY_SHAPE, interleaved_timings, paired_ratio, token_batch, train_step_fn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_depth  # noqa: E402

#: Llama-3.2-1B's shape (its config; the llama3 RoPE scaling is left out: it changes no cost).
LLAMA32_1B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
SHAPES = {"smollm2-135m": SMOLLM2_SHAPE, "llama3.2-1b": LLAMA32_1B_SHAPE, "tiny": TINY_SHAPE}
SHAPE_TITLES = {
    "smollm2-135m": "SmolLM2-135M shape (30 layers, width 576, vocab 49,152)",
    "llama3.2-1b": "Llama-3.2-1B shape (16 layers, width 2048, vocab 128,256)",
    "tiny": "tiny smoke shape (8 layers, width 64, vocab 256)",
}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str  # the method's name first: the table's rows are found by it
    reference: str  # the variant its ratios are taken against
    build: Callable[[torch.nn.Module, int, bool], torch.nn.Module]  # (base, num_layers, copy_base) -> PeftModel


def _record_failure(result, sec, label: str, error: Exception) -> None:
    """A variant that failed: its traceback printed, its row and the section's notes say why (the rest still runs)."""
    traceback.print_exc()
    result.error = f"{type(error).__name__}: {error}"[:200]
    sec.notes.append(f"{label}: {result.error}")


def _dlo(base, num_layers, copy_base):
    model = bench_dlo.build("dlo", base, copy_base=copy_base)
    bench_dlo.randomise_routers(model)  # random routers pick real subsets of tokens, as trained ones do
    return model


VARIANTS = {
    v.key: v
    for v in [
        Variant("lora", "LoRA r=8, 7 projections (reference)", "lora", lambda b, n, c: bench_mola.build("lora_r8", b, c)),
        Variant("lora_AA", "LoRA r=8, 7 projections, A/A copy", "lora", lambda b, n, c: bench_mola.build("lora_r8", b, c)),
        Variant("lora_qv", "LoRA r=8, q/v (MoLEx's reference)", "lora_qv", lambda b, n, c: bench_molex.build("lora_r8", b, n, c)),
        Variant("mola", "MoLA 8 experts top-2 r=8, 7 projections", "lora", lambda b, n, c: bench_mola.build("mola_e8_k2", b, c)),
        Variant("molex_vote", "MoLEx batch_vote (default), first half, LoRA q/v", "lora_qv", lambda b, n, c: bench_molex.build("molex_half_vote", b, n, c)),
        Variant("molex_token", "MoLEx token routing, first half, LoRA q/v", "lora_qv", lambda b, n, c: bench_molex.build("molex_half_token", b, n, c)),
        Variant("mod", "MoD K=4 + LoRA r=8, 7 projections", "lora", lambda b, n, c: bench_mod.build("mod_k4_lora", b, c)),
        Variant("dlo", "DLO interleave every 4, capacity 0.9", "lora", _dlo),
    ]
}  # fmt: skip
REFERENCE_NAMES = {"lora": "LoRA, 7 projections", "lora_qv": "LoRA q/v"}
#: Rows of the bf16 table (the references get rows too: LoRA as the A/A line, LoRA q/v against LoRA).
TABLE_ROWS = ["lora_AA", "lora_qv", "mola", "molex_vote", "molex_token", "mod", "dlo"]
#: What the QLoRA and FSDP2 paths run (one MoLEx routing is enough to see the path works).
PATH_VARIANTS = ["lora", "lora_qv", "mola", "molex_vote", "mod", "dlo"]
GIB = 2**30


# ----------------------------------------------------------------------------------------------------------- sections
class SectionTimeout(Exception):
    pass


class Stopped(BaseException):
    """SIGTERM (gpu_check.sh's overall time limit): print what was measured so far, then stop."""


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise ``SectionTimeout`` in this (main) thread after ``seconds`` of wall time."""

    def expire(signum, frame):
        raise SectionTimeout(f"time box of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Section:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_section(name: str, budget_s: float, fn: Callable[[Section, float], None], sections: list[Section]) -> None:
    """Run ``fn(section, deadline)`` under a time box; an exception or overrun is reported and the next section runs."""
    section = Section(name)
    sections.append(section)
    start = time.monotonic()
    print(f"\n== {name} (time box {budget_s:.0f} s)", flush=True)
    try:
        with time_box(budget_s):
            fn(section, start + budget_s)
        if section.status == "not run":
            section.status = "ok"
    except SectionTimeout as error:
        section.status = f"stopped: {error}"
    except Stopped:
        section.status = "stopped: SIGTERM, the overall time limit"
        section.seconds = time.monotonic() - start
        raise
    except Exception as error:  # isolation: any failure of one section is printed and the check goes on
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        section.status = f"failed: {type(error).__name__}: {message}"[:300]
    section.seconds = time.monotonic() - start
    print(f"== {name}: {section.status} ({section.seconds:.1f} s)", flush=True)
    release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def remaining(deadline: float) -> float:
    return deadline - time.monotonic()


# ------------------------------------------------------------------------------------------------------------- models
def make_base(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random weights in the shape's config, built on ``device`` (no download)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    return model.to(dtype)


def synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` under bf16 autocast on CUDA (as accelerate's and Trainer's bf16 runs), waiting for the GPU to finish."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn()
        torch.cuda.synchronize()

    return run


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.device, tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def counted_training_bytes(model: torch.nn.Module) -> int:
    """Resident weights + buffers, and per trained parameter its gradient and AdamW's two moments (CPU has no peak)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return tensor_bytes(list(model.parameters()) + list(model.buffers())) + 3 * tensor_bytes(trained)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------- training and decode
@dataclass
class VariantResult:
    trainable: int | None = None
    memory_bytes: float | None = None
    step_s: float | None = None
    step_ratio: float | None = None
    memory_ratio: float | None = None
    decode_s_per_token: float | None = None
    decode_ratio: float | None = None
    error: str | None = None


@dataclass
class ShapeRun:
    shape: str
    num_layers: int
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    results: dict[str, VariantResult] = field(default_factory=dict)
    repeats: int = 0
    decode_repeats: int = 0


def train_section(run: ShapeRun, args, device: torch.device, dtype: torch.dtype):
    def section(sec: Section, deadline: float) -> None:
        base = make_base(run.shape, device, dtype)
        batch = to_device(token_batch(args.batch_size, args.seq_len, vocab=SHAPES[run.shape]["vocab_size"]), device)
        steps = {}
        if device.type == "cuda":
            # The first matmuls and backward on the device allocate cuBLAS workspaces that stay: without a throwaway
            # step first they would be charged to the first variant measured (the LoRA reference).
            warm_up = VARIANTS["lora"].build(base, run.num_layers, True).train()
            synced(train_step_fn(warm_up, batch), device)()
            del warm_up
        for key, variant in VARIANTS.items():
            result = run.results.setdefault(key, VariantResult())
            try:
                release_memory()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                model = variant.build(base, run.num_layers, True)
                model.train()
                step = synced(train_step_fn(model, batch), device)
                step()  # two warm-up steps: AdamW's state exists from the first on
                step()
                if device.type == "cuda":
                    result.memory_bytes = torch.cuda.max_memory_allocated() - before
                else:
                    result.memory_bytes = counted_training_bytes(model)
                result.trainable = trainable_parameters(model)
                run.models[key] = model
                steps[key] = step
            except SectionTimeout:
                raise
            except Exception as error:
                _record_failure(result, sec, key, error)
        del base
        if "lora" not in steps:
            raise RuntimeError("the LoRA reference did not build or step")
        times = timed_rounds(steps, args.repeats, deadline)
        run.repeats = len(times["lora"])
        for key in steps:
            result = run.results[key]
            reference = VARIANTS[key].reference
            result.step_s = statistics.median(times[key])
            if reference in times:
                result.step_ratio = paired_ratio(times, key, reference)
            ref_memory = run.results[reference].memory_bytes
            if result.memory_bytes and ref_memory:
                result.memory_ratio = result.memory_bytes / ref_memory
        for model in run.models.values():
            model.zero_grad(set_to_none=True)

    return section


def time_one_round(fns: dict[str, Callable[[], None]]) -> float:
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    return time.perf_counter() - start


def timed_rounds(fns: dict[str, Callable[[], None]], most: int, deadline: float) -> dict[str, list[float]]:
    """``common.interleaved_timings`` one shuffled round at a time, as many rounds (1 to ``most``) as fit before
    ``deadline``: what was timed is kept when the time box ends the section."""
    round_s = time_one_round(fns)  # also a warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for index in range(most):
        if index and remaining(deadline) < 1.5 * round_s:
            break
        for name, values in interleaved_timings(fns, repeats=1, warmup=0, seed=index).items():
            times[name] += values
    return times


def decode_section(run: ShapeRun, args, device: torch.device):
    def section(sec: Section, deadline: float) -> None:
        if "lora" not in run.models:
            raise RuntimeError("no models: the training section of this shape did not build them")
        vocab = SHAPES[run.shape]["vocab_size"]
        prompt = {k: v for k, v in to_device(token_batch(1, 16, vocab=vocab, seed=1), device).items() if k != "labels"}
        decodes = {}
        for key, model in run.models.items():
            model.eval()
            decode = synced(bench_mola.decode_fn(model, prompt, args.new_tokens), device)
            try:
                decode()  # warm-up (and MoLEx batch_vote's one warning: it generates without cache)
                decodes[key] = decode
            except SectionTimeout:
                raise
            except Exception as error:
                traceback.print_exc()
                message = f"{type(error).__name__}: {error}"[:200]
                sec.notes.append(f"decode {key}: {message}")
        times = timed_rounds(decodes, args.decode_repeats, deadline)
        run.decode_repeats = len(next(iter(times.values()), []))
        for key in decodes:
            result = run.results[key]
            result.decode_s_per_token = statistics.median(times[key]) / args.new_tokens
            reference = VARIANTS[key].reference
            if reference in times:
                result.decode_ratio = paired_ratio(times, key, reference)

    return section


# -------------------------------------------------------------------------------------------------------------- QLoRA
def qlora_section(args, device: torch.device, results: dict[str, dict[str, VariantResult]]):
    def section(sec: Section, deadline: float) -> None:
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        place = torch.cuda.current_device() if device.type == "cuda" else "cpu"
        for shape in args.qlora_shapes:
            if remaining(deadline) < 5:
                sec.notes.append(f"{shape}: skipped: time box")
                continue
            shape_results = results.setdefault(shape, {})
            folder = tempfile.mkdtemp(prefix=f"gpu-check-{shape}-")
            try:
                make_base(shape, device, torch.bfloat16).save_pretrained(folder)
                release_memory()
                batch = to_device(
                    token_batch(args.batch_size, args.seq_len, vocab=SHAPES[shape]["vocab_size"]), device
                )
                last_s = 0.0
                for key in PATH_VARIANTS:
                    result = shape_results.setdefault(key, VariantResult())
                    if remaining(deadline) < 1.5 * last_s:
                        result.error = "skipped: time box"
                        sec.notes.append(f"{shape} {key}: skipped, the time box would not fit it")
                        continue
                    variant_start = time.monotonic()
                    try:
                        release_memory()
                        model = AutoModelForCausalLM.from_pretrained(
                            folder, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": place}
                        )
                        model = prepare_model_for_kbit_training(
                            model, gradient_checkpointing_kwargs={"use_reentrant": False}
                        )
                        model = VARIANTS[key].build(model, SHAPES[shape]["num_hidden_layers"], False)
                        model.train()
                        step = synced(train_step_fn(model, batch), device)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        step()  # warm-up: AdamW's state is created here
                        start = time.perf_counter()
                        step()
                        result.step_s = time.perf_counter() - start
                        result.trainable = trainable_parameters(model)
                        if device.type == "cuda":
                            result.memory_bytes = torch.cuda.max_memory_allocated()
                        else:
                            result.memory_bytes = counted_training_bytes(model)
                    except SectionTimeout:
                        raise
                    except Exception as error:
                        _record_failure(result, sec, f"{shape} {key}", error)
                    finally:
                        model = step = None  # only one quantized model at a time: the peak is its own
                    last_s = time.monotonic() - variant_start
                for key, result in shape_results.items():
                    reference = shape_results.get(VARIANTS[key].reference)
                    if reference and result.step_s and reference.step_s:
                        result.step_ratio = result.step_s / reference.step_s
                    if reference and result.memory_bytes and reference.memory_bytes:
                        result.memory_ratio = result.memory_bytes / reference.memory_bytes
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    return section


# -------------------------------------------------------------------------------------------------------------- FSDP2
def fsdp_section(args, results: dict[str, dict]):
    def section(sec: Section, deadline: float) -> None:
        config = REPO / "examples" / "accelerate_fsdp2.yaml"
        with socket.socket() as probe:  # a free port for torchrun's rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(config), "--num_processes", "1", "--main_process_port", str(port),
            str(Path(__file__).resolve()), "--fsdp-child", "--fsdp-shape", args.fsdp_shape,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        ]  # fmt: skip
        print(" ".join(command), flush=True)
        start = time.monotonic()
        timeout = max(5.0, remaining(deadline) - 3)
        # a session of its own: on a timeout the launcher and torchrun's workers are stopped together
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            output, errors = process.communicate(timeout=timeout)
            code = process.returncode
        except BaseException as error:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            output, errors = process.communicate()
            code = None
            sec.notes.append(f"the launched process was stopped after {time.monotonic() - start:.0f} s")
            if not isinstance(error, subprocess.TimeoutExpired):
                raise
        sys.stderr.write(errors[-6000:])
        for line in output.splitlines():
            if line.startswith("FSDP_RESULT "):
                row = json.loads(line.removeprefix("FSDP_RESULT "))
                results[row["variant"]] = row
        if code not in (0, None):
            sec.notes.append(f"accelerate launch exited with {code}")
        missing = [key for key in PATH_VARIANTS if key not in results]
        if missing:
            sec.notes.append(f"no result for {', '.join(missing)}")
        if code != 0 or missing:
            sec.status = "failed: see notes"

    return section


def fsdp_child(args) -> None:
    """Runs under ``accelerate launch`` (or alone, on CPU, in the smoke test): one JSON line per variant."""
    from accelerate import Accelerator
    from peft import PeftModel
    from torch.distributed.tensor import DTensor

    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    print(f"FSDP_CHILD distributed_type={accelerator.distributed_type.name} device={device}", flush=True)
    shape = args.fsdp_shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = to_device(token_batch(args.batch_size, args.seq_len, vocab=SHAPES[shape]["vocab_size"]), device)
    num_layers = SHAPES[shape]["num_hidden_layers"]
    for key in PATH_VARIANTS:
        row: dict = {"variant": key, "ok": False}
        try:
            model = VARIANTS[key].build(make_base(shape, device, dtype), num_layers, False)
            model.train()
            trained_names = [name for name, p in model.named_parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            model, optimizer = accelerator.prepare(model, optimizer)
            times, losses = [], []
            for _ in range(3):
                start = time.perf_counter()
                with accelerator.autocast():
                    out = model(**batch)
                    loss = out.loss + sum(peft_depth.aux_losses(model).values())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                losses.append(float(loss.detach()))
            trained = [p for p in model.parameters() if p.requires_grad]
            row["dtensor"] = bool(trained) and all(isinstance(p, DTensor) for p in trained)
            row["step_s"] = statistics.median(times[1:])
            row["loss_finite"] = all(math.isfinite(x) for x in losses)
            state = accelerator.get_state_dict(model)  # the full state dict, gathered (FULL_STATE_DICT)
            if accelerator.is_main_process:
                with tempfile.TemporaryDirectory() as folder:
                    accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state)
                    reloaded = PeftModel.from_pretrained(make_base(shape, device, dtype), folder)
                    reloaded_state = reloaded.state_dict()
                    # in the dtype the reload keeps (a weight trained as float32 master copy on a bf16 base rounds)
                    row["reload_max_diff"] = max(
                        float((state[name].to(reloaded_state[name]) - reloaded_state[name]).abs().max().float())
                        for name in trained_names
                    )
                    del reloaded
            sharded = accelerator.distributed_type.name == "FSDP"
            row["ok"] = (
                row["loss_finite"] and row.get("reload_max_diff", 0.0) == 0.0 and (row["dtensor"] or not sharded)
            )
            del model, optimizer, state
        except Exception as error:
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        accelerator.free_memory()
        release_memory()
        print("FSDP_RESULT " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------------------- report
def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def hardware_line(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(0)
        hardware = f"{torch.cuda.get_device_name(0)} ({properties.total_memory / GIB:.0f} GiB)"
        with contextlib.suppress(Exception):
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()[0]  # fmt: skip
            hardware += f", driver {driver}"
        hardware += f", CUDA {torch.version.cuda}"
    else:
        hardware = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), no GPU"
    versions = ", ".join(
        f"{name} {version(name)}"
        for name in ("torch", "transformers", "peft", "peft-depth", "accelerate", "bitsandbytes")
    )
    return (
        f"**Hardware**: {hardware}. **Versions**: {versions}, Python {platform.python_version()}. "
        f"{datetime.date.today().isoformat()}."
    )


#: peft-depth's requirements that no code this check runs imports (the TRL trainer, the examples' data).
NOT_NEEDED_HERE = {"trl", "datasets", "evaluate"}


def unmet_requirements(names=("peft-depth", "transformers", "peft", "accelerate", "bitsandbytes")) -> list[str]:
    """Requirements of the installed packages that this environment does not meet (``pip check`` for a few names;
    gpu_check.sh installs the wheels with --no-deps onto what the GPU machine has)."""
    from packaging.requirements import Requirement

    unmet = []
    for name in names:
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or one for another platform
            if requirement.name in NOT_NEEDED_HERE:
                continue
            found = version(requirement.name)
            if found == "absent" or not requirement.specifier.contains(found, prereleases=True):
                unmet.append(f"{name} needs {requirement}, found {found}")
    return unmet


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


MEMORY_NOTES = {
    "cuda": "Peak memory: `torch.cuda.max_memory_allocated` while the variant is built (its own copy of the base) and "
    "takes its first two steps, less what was allocated before: weights, AdamW state, gradients and activations.",
    "cpu": "Memory (CPU has no allocator peak): the variant's weights, gradients and AdamW state, counted; no "
    "activations.",
}


def shape_table(run: ShapeRun, args, dtype: torch.dtype) -> str:
    lines = [
        f"#### {SHAPE_TITLES[run.shape]}, {str(dtype).removeprefix('torch.')}, batch {args.batch_size}×{args.seq_len}"
        f" ({run.repeats} interleaved training repeats; decode: 16-token prompt + {args.new_tokens} tokens, "
        f"{run.decode_repeats} repeats)",
        "",
        MEMORY_NOTES["cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"],
        "",
        "| method (config) | vs | trainable | step (ms) | step × ref | peak memory (GiB) | memory × ref "
        "| decode (ms/token) | decode × ref |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in TABLE_ROWS:
        result = run.results.get(key, VariantResult())
        reference = REFERENCE_NAMES[VARIANTS[key].reference] if VARIANTS[key].reference != key else "itself"
        trainable = f"{result.trainable / 1e6:,.2f} M" if result.trainable else "–"
        cells = [
            VARIANTS[key].label,
            reference,
            trainable,
            fmt(None if result.step_s is None else 1000 * result.step_s, ".1f"),
            fmt(result.step_ratio, ".3f"),
            fmt(None if result.memory_bytes is None else result.memory_bytes / GIB, ".3f"),
            fmt(result.memory_ratio, ".3f"),
            fmt(None if result.decode_s_per_token is None else 1000 * result.decode_s_per_token, ".2f"),
            fmt(result.decode_ratio, ".3f"),
        ]
        if result.error:
            cells[3] = f"failed: {result.error[:80]}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qlora_table(results: dict[str, dict[str, VariantResult]]) -> str:
    lines = [
        "| shape | method | trainable | step (ms) | step × ref | peak memory (GiB) | memory × ref |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for shape, rows in results.items():
        for key in PATH_VARIANTS:
            result = rows.get(key)
            if result is None:
                continue
            step = fmt(None if result.step_s is None else 1000 * result.step_s, ".1f")
            if result.error:
                step = result.error if result.error.startswith("skipped") else f"failed: {result.error[:80]}"
            lines.append(
                f"| {shape} | {VARIANTS[key].label} | "
                f"{f'{result.trainable / 1e6:,.2f} M' if result.trainable else '–'} | {step} | "
                f"{fmt(result.step_ratio, '.3f')} | "
                f"{fmt(None if result.memory_bytes is None else result.memory_bytes / GIB, '.3f')} | "
                f"{fmt(result.memory_ratio, '.3f')} |"
            )
    return "\n".join(lines)


def fsdp_table(results: dict[str, dict]) -> str:
    lines = [
        "| method | parameters DTensor | step (ms) | loss finite | saved adapter reloads (max diff) | result |",
        "|---|---|---:|---|---:|---|",
    ]
    for key in PATH_VARIANTS:
        row = results.get(key)
        if row is None:
            lines.append(f"| {VARIANTS[key].label} | – | – | – | – | no result |")
            continue
        result = "ok" if row.get("ok") else f"failed: {row.get('error', 'see columns')[:100]}"
        lines.append(
            f"| {VARIANTS[key].label} | {row.get('dtensor', '–')} | "
            f"{fmt(None if row.get('step_s') is None else 1000 * row['step_s'], '.1f')} | "
            f"{row.get('loss_finite', '–')} | {fmt(row.get('reload_max_diff'), '.1e')} | {result} |"
        )
    return "\n".join(lines)


def report(device, dtype, args, runs, qlora, fsdp, sections) -> str:
    parts = [f"### GPU check ({'smoke run, ' if args.tiny else ''}benchmarks/gpu_check.py)", "", hardware_line(device)]
    for run in runs:
        if {"train", "decode"} & args.sections:
            parts += ["", shape_table(run, args, dtype)]
    by_name = {section.name: section for section in sections}
    if "qlora" in by_name and by_name["qlora"].status.startswith("skipped"):
        parts += ["", f"#### QLoRA (NF4 base): {by_name['qlora'].status}"]
    elif "qlora" in by_name:
        parts += ["", "#### QLoRA: NF4 base (double quantization, bf16 compute), one step after one warm-up", ""]
        parts.append(qlora_table(qlora))
    if "fsdp2" in by_name and by_name["fsdp2"].status.startswith("skipped"):
        parts += ["", f"#### accelerate FSDP2, world size 1: {by_name['fsdp2'].status}"]
    elif "fsdp2" in by_name:
        parts += [
            "",
            f"#### accelerate FSDP2 (examples/accelerate_fsdp2.yaml), world size 1, {args.fsdp_shape} shape, 3 steps",
            "",
            fsdp_table(fsdp),
        ]
    parts += ["", "| section | status | seconds |", "|---|---|---:|"]
    for section in sections:
        parts.append(f"| {section.name} | {section.status} | {section.seconds:.1f} |")
    notes = [f"- environment: {problem}" for problem in args.unmet]
    notes += [f"- {section.name}: {note}" for section in sections for note in section.notes]
    if notes:
        parts += ["", "Notes:", *notes]
    return "\n".join(parts) + "\n"


def skipped(reason: str) -> Callable[[Section, float], None]:
    def section(sec: Section, deadline: float) -> None:
        sec.status = f"skipped: {reason}"

    return section


# --------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: the tiny shape, few repeats, short budgets")
    parser.add_argument("--shapes", default=None, help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="most interleaved training repeats")
    parser.add_argument("--decode-repeats", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every section's time box")
    parser.add_argument("--output", default=None, help="also write the markdown here (rewritten after each section)")
    parser.add_argument("--sections", default="train,decode,qlora,fsdp2")
    parser.add_argument(
        "--qlora-on-cpu", action="store_true", help="tests only: run the QLoRA path on CPU (bitsandbytes >= 0.50)"
    )
    parser.add_argument("--fsdp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        shapes="tiny" if tiny else "smollm2-135m,llama3.2-1b",
        batch_size=2 if tiny else 4,
        seq_len=32 if tiny else 512,
        repeats=3 if tiny else 20,
        decode_repeats=2 if tiny else 5,
        new_tokens=8 if tiny else 64,
        fsdp_shape="tiny" if tiny else "smollm2-135m",
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes + [args.fsdp_shape] if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    args.qlora_shapes = ["tiny"] if tiny else ["smollm2-135m", "llama3.2-1b"]
    args.sections = set(args.sections.split(","))
    return args


#: Time boxes in seconds (``--budget-scale`` scales them): 370 s for the two GPU shapes, QLoRA and FSDP2, within
#: gpu_check.sh's 8 minutes with the install (~30 s) and the imports.
BUDGETS = {"train": {"smollm2-135m": 50, "llama3.2-1b": 70, "tiny": 20}, "decode": 30, "qlora": 100, "fsdp2": 90}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fsdp_child:
        fsdp_child(args)
        return 0
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = args.budget_scale
    print(hardware_line(device), flush=True)
    args.unmet = unmet_requirements()
    for problem in args.unmet:
        print(f"environment: {problem}", flush=True)

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    sections: list[Section] = []
    runs: list[ShapeRun] = []
    qlora: dict[str, dict[str, VariantResult]] = {}
    fsdp: dict[str, dict] = {}

    def flush_report() -> str:
        text = report(device, dtype, args, runs, qlora, fsdp, sections)
        if args.output:
            Path(args.output).write_text(text)
        return text

    stopped = False
    try:
        for shape in args.shapes:
            run = ShapeRun(shape, SHAPES[shape]["num_hidden_layers"])
            runs.append(run)
            if "train" in args.sections:
                budget = BUDGETS["train"][shape] * scale
                run_section(f"train {shape}", budget, train_section(run, args, device, dtype), sections)
                flush_report()
            if "decode" in args.sections:
                run_section(f"decode {shape}", BUDGETS["decode"] * scale, decode_section(run, args, device), sections)
                flush_report()
            run.models.clear()  # free this shape's models before the next
            release_memory()
        if "qlora" in args.sections:
            if device.type == "cuda" or args.qlora_on_cpu:
                run_section("qlora", BUDGETS["qlora"] * scale, qlora_section(args, device, qlora), sections)
            else:
                run_section("qlora", 1, skipped("needs CUDA"), sections)
            flush_report()
        if "fsdp2" in args.sections:
            if device.type == "cuda":
                run_section("fsdp2", BUDGETS["fsdp2"] * scale, fsdp_section(args, fsdp), sections)
            else:
                # accelerate turns FSDP on only for accelerator devices: on CPU the same config silently runs DDP
                run_section("fsdp2", 1, skipped("needs CUDA"), sections)
    except Stopped:
        stopped = True
        print("gpu_check.py: stopped by SIGTERM; the tables below hold what was measured", flush=True)
    text = flush_report()
    print("\n" + text, flush=True)
    return 124 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
