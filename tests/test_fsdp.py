"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on two gloo CPU processes trains every depth method as one process.

accelerate turns FSDP on only for accelerator devices (on CPU its FSDP config silently runs DDP), so the workers call
``fully_shard`` themselves, as accelerate's ``TRANSFORMER_BASED_WRAP`` does: every decoder layer found by class in
``model.modules()`` (DLO's inserted layers included), then the ``PeftModel`` as the root (MoLEx's gates, MoD's norms
and DLO's routers live on the tuner, so in the root's group). One spawn runs every method; per method it checks:

- every parameter is a ``DTensor`` and every decoder layer, the inserted ones too, an ``FSDPModule``;
- the gradients after the full backward (LM loss + ``peft_depth.aux_losses``, routing statistics synced) equal one
  process on the same global batch; MoLEx's expert calls run other layers from their shards;
- a distributed checkpoint (``torch.distributed.checkpoint``: trainable parameters, optimizer state and the tuners'
  ``depth_checkpoint_state``) resumes to exactly the weights of an uninterrupted run;
- the adapter saved on rank 0 from the gathered state dict (``save_pretrained(state_dict=...)``) is, byte for byte,
  the one ``save_pretrained`` writes for an unsharded model holding the same weights.

The file also holds the checks that need no processes: DeepSpeed ZeRO-3 (its flag faked) is refused naming FSDP2,
and ``examples/accelerate_fsdp2.yaml`` loads with accelerate's own config loader.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from test_multiprocess import _free_port, _max_rel_diff
from tiny_models import VOCAB, tiny_llama
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import peft_depth

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS")

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATE = 1e-2
#: Real tokens per row of the global batch (left-padded to 9); rows 0-1 go to process 0, rows 2-3 to process 1. Each
#: half holds 14 predicted tokens, so the mean of the two processes' token-mean losses is the global token mean.
ROW_LENGTHS = (9, 6, 7, 7)
WIDTH = max(ROW_LENGTHS)


def _configs() -> dict:
    return {
        "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, num_experts=4, top_k=2, lora_dropout=0.0),
        # token routing: each token picks its own expert layer, so block i calls several other blocks' shards, and
        # each process other ones; sequence routing runs an expert on the rows that chose it only
        "molex": lambda: peft_depth.MoLExConfig(
            task_type="CAUSAL_LM", r=4, lora_dropout=0.0, routing="token", learn_alpha=True
        ),
        "molex_sequence": lambda: peft_depth.MoLExConfig(
            task_type="CAUSAL_LM", r=4, lora_dropout=0.0, routing="sequence", shared_gate=False
        ),
        "mod": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM"),
        # two inserted layers, LoRA on the originals, cos_global capacities (a resume must restore them)
        "dlo": lambda: peft_depth.DLOConfig(
            task_type="CAUSAL_LM", r=4, lora_dropout=0.0, expand_every=2, capacity=0.5, capacity_annealing_steps=0
        ),
    }


METHODS = sorted(_configs())


def _build(method: str) -> torch.nn.Module:
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(num_layers=4, seed=0).train(), _configs()[method]())
    if method == "molex_sequence":
        # Gates wider than their init and without bias: the rows of a process then choose different layers, and the
        # processes other ones (each runs the others' choices too, and experts on part of its rows).
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.base_model.molex_gate.named_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * (0 if name.endswith("bias") else 3))
    return model


def _global_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(ROW_LENGTHS), WIDTH), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(ROW_LENGTHS):
        attention_mask[row, WIDTH - length :] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _rows(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    per_process = len(ROW_LENGTHS) // world_size
    return {k: v[rank * per_process : (rank + 1) * per_process] for k, v in batch.items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process calls it), or the tensor itself."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _train_step(model, optimizer, step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """One optimizer step on global batch ``step`` (this process's rows); returns the whole gradients."""
    from peft_depth.trainer import set_training_step

    set_training_step(model, step)
    output = model(**_rows(_global_batch(seed=step), rank, world_size))
    loss = output.loss + sum(peft_depth.aux_losses(model).values())
    loss.backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad()
    return grads


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)


# ------------------------------------------------------------------------------------------------ the processes


def _shard(model) -> None:
    """What accelerate's TRANSFORMER_BASED_WRAP does: each decoder layer by class, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, LlamaDecoderLayer):
            fully_shard(module)
    fully_shard(model)


def _sharded(method: str):
    from peft_depth.trainer import set_sync_routing_stats

    model = _build(method)
    set_sync_routing_stats(model, True)
    _shard(model)
    return model, _optimizer(model)


def _checkpoint_options(loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The trainable tensors only: the frozen base is the pretrained model, loaded from its own files (so a load must
    # not be strict; the caller checks that only frozen tensors were missing).
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _save_checkpoint(model, optimizer, folder: str, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from peft_depth.trainer.hooks import checkpoint_state

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_checkpoint_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    if rank == 0:
        torch.save(checkpoint_state(model), os.path.join(folder, "depth_tuner_state.pt"))


def _resume(method: str, folder: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from peft_depth.trainer.hooks import load_checkpoint_state

    model, optimizer = _sharded(method)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_checkpoint_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    missing, unexpected = set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_checkpoint_options(loading=True),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not unexpected and not trainable & set(missing), (unexpected, trainable & set(missing))
    load_checkpoint_state(model, torch.load(os.path.join(folder, "depth_tuner_state.pt"), weights_only=True))
    return model, optimizer


def _save_adapter(model, trainable: dict[str, torch.Tensor], method: str, out: str, rank: int) -> None:
    """Rank 0 saves the gathered adapter, and the adapter of an unsharded model given the same weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    if rank != 0:
        return
    model.save_pretrained(os.path.join(out, "sharded"), state_dict=gathered)
    plain = _build(method)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name in trainable:
                param.copy_(trainable[name])
    plain.save_pretrained(os.path.join(out, "unsharded"))


def _run_method(method: str, rank: int, world_size: int, out: str) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model, optimizer = _sharded(method)
    result = {
        "plain_parameters": sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor)),
        "unsharded_layers": sorted(
            n for n, m in model.named_modules() if isinstance(m, LlamaDecoderLayer) and not isinstance(m, FSDPModule)
        ),
        "sharded_layers": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
    }
    result["grads"] = _train_step(model, optimizer, step=1, rank=rank, world_size=world_size)
    result["routing"] = peft_depth.routing_stats(model)
    folder = os.path.join(out, f"{method}-checkpoint")
    _save_checkpoint(model, optimizer, folder, rank)
    _train_step(model, optimizer, step=2, rank=rank, world_size=world_size)
    result["after_two_steps"] = _trainable(model)
    _save_adapter(model, result["after_two_steps"], method, os.path.join(out, method), rank)

    resumed, resumed_optimizer = _resume(method, folder)
    _train_step(resumed, resumed_optimizer, step=2, rank=rank, world_size=world_size)
    result["resumed"] = _trainable(resumed)
    return result


def _shard_dlo_wrappers() -> None:
    """The common recipe `for layer in model.model.layers: fully_shard(layer)` meets DLO's routing wrappers."""
    from torch.distributed.fsdp import fully_shard

    model = _build("dlo")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)


def _layers_only_forward(method: str, rank: int, world_size: int) -> str:
    """Only the decoder layers sharded, not the PeftModel root: the tuner's own parameters stay plain tensors."""
    from torch.distributed.fsdp import fully_shard

    from peft_depth.trainer import set_training_step

    model = _build(method)
    for module in list(model.modules()):
        if isinstance(module, LlamaDecoderLayer):
            fully_shard(module)
    set_training_step(model, 0)  # what DepthSFTTrainer does before every micro-batch
    model(**_rows(_global_batch(seed=1), rank, world_size))
    return "ran"


def _dlo_block_skip_forward(rank: int, world_size: int) -> None:
    """DLO's skip_mode='block' calls a sharded layer as often as this process's tokens need."""
    from peft import get_peft_model

    config = peft_depth.DLOConfig(task_type="CAUSAL_LM", skip_mode="block", capacity=0.5, capacity_annealing_steps=0)
    model = get_peft_model(tiny_llama(num_layers=4, seed=0).train(), config)
    _shard(model)
    model(**_rows(_global_batch(seed=1), rank, world_size))


def _outcome(run, *args) -> dict:
    """``run(*args)``'s result, or its error (its method's tests report it; the other methods still run)."""
    try:
        return {"result": run(*args)}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(1)
    # a collective that one process never joins fails after the timeout instead of hanging the suite
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=180)
    )
    try:
        results = {method: _outcome(_run_method, method, rank, world_size, out) for method in METHODS}
        results["dlo_wrappers"] = _outcome(_shard_dlo_wrappers)
        results["dlo_block_skip"] = _outcome(_dlo_block_skip_forward, rank, world_size)
        for method in ("molex", "mola"):
            results[f"{method}_layers_only"] = _outcome(_layers_only_forward, method, rank, world_size)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    return rank0, rank1, out


def _results(two_processes, name: str) -> tuple[dict, dict]:
    """Both processes' results of ``name``; fails with the error a process met instead."""
    rank0, rank1, _ = two_processes
    for outcome in (rank0[name], rank1[name]):
        if "error" in outcome:
            pytest.fail(f"{name} failed in a process:\n{outcome['traceback']}", pytrace=False)
    return rank0[name]["result"], rank1[name]["result"]


def _error(two_processes, name: str) -> str:
    outcome = two_processes[0][name]
    return outcome.get("error", "no error")


_REFERENCE: dict = {}


def _reference(method: str) -> dict:
    """One process, no sharding, the whole global batch: step-1 gradients and the weights after two steps."""
    if method not in _REFERENCE:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = _build(method)
            optimizer = _optimizer(model)
            grads = _train_step(model, optimizer, step=1)
            _train_step(model, optimizer, step=2)
            _REFERENCE[method] = {"grads": grads, "after_two_steps": _trainable(model)}
        finally:
            torch.set_num_threads(previous)
    return _REFERENCE[method]


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("method", METHODS)
def test_every_parameter_is_sharded(method, two_processes):
    result, _ = _results(two_processes, method)
    assert result["plain_parameters"] == []
    assert result["unsharded_layers"] == []
    if method == "dlo":
        inserted = [n for n in result["sharded_layers"] if ".dlo_new_layers." in n]
        assert len(inserted) == 2, result["sharded_layers"]


@pytest.mark.parametrize("method", METHODS)
def test_gradients_equal_one_process(method, two_processes):
    result0, result1 = _results(two_processes, method)
    reference = _reference(method)["grads"]
    grads0, grads1 = result0["grads"], result1["grads"]
    assert set(grads0) == set(reference)
    for name in reference:
        torch.testing.assert_close(grads0[name], grads1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads0[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)
    print(
        f"{method}: max relative gradient difference, 2 sharded processes vs 1: {_max_rel_diff(grads0, reference):.1e}"
    )


@pytest.mark.parametrize("method", ["molex", "molex_sequence"])
def test_molex_experts_ran_other_layers_from_their_shards(method, two_processes):
    result, _ = _results(two_processes, method)
    rows = result["routing"]["molex"]["default"]
    chosen = [(row["layer"], row["chosen"]) for row in rows]
    assert any(any(j != layer for j in layers) for layer, layers in chosen), chosen


@pytest.mark.parametrize("method", METHODS)
def test_training_from_the_same_start_matches_one_process(method, two_processes):
    result, _ = _results(two_processes, method)
    reference = _reference(method)["after_two_steps"]
    for name, value in result["after_two_steps"].items():
        # AdamW divides each entry by its own gradient scale, so rounding-level differences in near-zero gradient
        # entries move weights by up to ~1e-3 of the learning rate (seen: 8e-6 at lr 1e-2)
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=5e-3 * LEARNING_RATE, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_distributed_checkpoint_resumes_exactly(method, two_processes):
    for result in _results(two_processes, method):
        assert set(result["resumed"]) == set(result["after_two_steps"])
        for name, value in result["resumed"].items():
            assert torch.equal(value, result["after_two_steps"][name]), name


@pytest.mark.parametrize("method", METHODS)
def test_adapter_saved_from_shards_equals_unsharded_save(method, two_processes):
    from peft import PeftModel
    from safetensors.torch import load_file

    result, _ = _results(two_processes, method)
    folders = two_processes[2] / method / "sharded", two_processes[2] / method / "unsharded"
    for filename in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folders[0] / filename).read_bytes() == (folders[1] / filename).read_bytes(), filename
    assert load_file(folders[0] / "adapter_model.safetensors")  # not an empty adapter
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=4, seed=0), str(folders[0]))
    trained = result["after_two_steps"]
    for name, param in loaded.named_parameters():
        if name in trained:
            assert torch.equal(param.detach(), trained[name]), name


def test_sharding_dlo_routing_wrappers_is_refused_clearly(two_processes):
    message = _error(two_processes, "dlo_wrappers")
    assert message.startswith("TypeError") and "DLOBlock" in message and "TRANSFORMER_BASED_WRAP" in message, message


def test_a_tuner_parameter_outside_every_shard_is_refused_clearly(two_processes):
    # MoLEx's gates live on the tuner: with only the layers sharded, FSDP would never reduce their gradients and each
    # process would train its own copy, silently. MoLA's parameters all sit inside the layers: nothing to refuse.
    message = _error(two_processes, "molex_layers_only")
    assert message.startswith("RuntimeError") and "molex_gate" in message and "fully_shard(peft_model)" in message, (
        message
    )
    assert _results(two_processes, "mola_layers_only") == ("ran", "ran")


def test_dlo_block_skipping_on_sharded_layers_is_refused_clearly(two_processes):
    """Calls that depend on each process's tokens cannot follow FSDP2's collectives (they crashed gloo before)."""
    message = _error(two_processes, "dlo_block_skip")
    assert message.startswith("NotImplementedError") and "skip_mode='mlp'" in message, message


# ------------------------------------------------------------------------------------------------ no processes


@pytest.fixture
def deepspeed_zero3(monkeypatch):
    """transformers' ZeRO-3 flag, faked on (no deepspeed installed): set while a ZeRO-3 TrainingArguments lives."""
    from transformers.integrations import deepspeed

    monkeypatch.setattr(deepspeed, "is_deepspeed_zero3_enabled", lambda: True)


@pytest.mark.parametrize("method", ["dlo", "mod", "mola", "molex"])
def test_deepspeed_zero3_injection_is_refused_naming_fsdp2(method, deepspeed_zero3):
    from peft import get_peft_model

    model = tiny_llama(num_layers=4)
    with pytest.raises(ValueError, match="ZeRO-3.*FSDP2"):
        get_peft_model(model, _configs()[method]())
    assert not any("lora_" in name or "molex" in name for name, _ in model.named_parameters())


def test_depth_sft_trainer_refuses_deepspeed_zero3_from_its_arguments(tmp_path):
    """A model adapted before the trainer, and a ZeRO-3 plugin on the trainer's arguments (as accelerate sets it)."""
    from trainer_fixtures import counting_dataset, tiny_tokenizer

    model = _build("mola")
    args = peft_depth.DepthSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    args.deepspeed_plugin = SimpleNamespace(zero_stage=3)
    with pytest.raises(ValueError, match="DepthSFTTrainer.*ZeRO-3.*FSDP2"):
        peft_depth.DepthSFTTrainer(
            model=model, args=args, train_dataset=counting_dataset(4), processing_class=tiny_tokenizer()
        )


def test_depth_sft_trainer_refuses_deepspeed_zero3_with_a_depth_peft_config(tmp_path, deepspeed_zero3):
    from trainer_fixtures import counting_dataset, tiny_tokenizer

    args = peft_depth.DepthSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="DepthSFTTrainer.*ZeRO-3.*FSDP2"):
        peft_depth.DepthSFTTrainer(
            model=tiny_llama(num_layers=4),
            args=args,
            train_dataset=counting_dataset(4),
            processing_class=tiny_tokenizer(),
            peft_config=_configs()["molex"](),
        )


def test_accelerate_fsdp2_example_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(ROOT / "examples" / "accelerate_fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # Trainer then saves a loadable adapter
