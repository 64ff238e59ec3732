"""Two CPU processes (gloo, DDP through accelerate) reproduce a one-process run on the same global batch.

With ``sync_routing_stats=True`` batch-level routing statistics (MoLA's balance-loss f·P, MoLEx's layer vote, DLO's
batch-wide top-k) are all-reduced during the forward, so the gradients after DDP's averaging equal those of one
process that sees the whole global batch. Without it each process balances / votes / selects on its own shard: the LM
part of the gradient still matches, the routing part does not (``test_without_sync_the_routing_gradient_differs``).
"""

import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from trainer_fixtures import GradCapture, counting_dataset, make_trainer

GLOBAL_BATCH = 4


def _configs():
    import peft_depth

    configs = {
        "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, num_experts=4, top_k=2, lora_dropout=0.0),
    }
    try:
        from peft_depth.tuners.molex import MoLExConfig

        configs["molex"] = lambda: MoLExConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0, routing="batch_vote")
    except ImportError:
        pass
    try:
        from peft_depth.tuners.mod import MoDConfig

        # the gate starts open so the router gets gradient; the distillation is a mean over the global batch's
        # labelled positions, and the processes' shards hold different numbers of them
        configs["mod"] = lambda: MoDConfig(task_type="CAUSAL_LM", num_late_layers=2, gate_init=0.5)
    except ImportError:
        pass
    try:
        from peft_depth.tuners.dlo import DLOConfig

        # capacity 0.5 from the first step, so the batch-wide top-k really selects; the routers start at zero, so
        # every score ties and only the selection's tie order decides which tokens run
        configs["dlo"] = lambda: DLOConfig(task_type="CAUSAL_LM", capacity=0.5, capacity_annealing_steps=0)
    except ImportError:
        pass
    return configs


def _one_step(method: str, sync: bool, world_size: int, out: str):
    """One optimizer step on rows 0..3 (split over the processes); returns (grads, logged entry)."""
    capture = GradCapture()
    trainer = make_trainer(
        _configs()[method](),
        out,
        dataset=counting_dataset(2 * GLOBAL_BATCH),
        max_steps=1,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,
        sync_routing_stats=sync,
        callbacks=[capture],
    )
    trainer.train()
    entry = [e for e in trainer.state.log_history if "loss" in e][-1]
    return capture.grads[0], entry


def _join_process_group_environment(rank: int, world_size: int, port: int) -> None:
    """What accelerate reads to join the gloo group (as torchrun would set it), offline, one thread a process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    torch.set_num_threads(1)


def _worker(rank: int, world_size: int, port: int, jobs: list, out_dir: str) -> None:
    _join_process_group_environment(rank, world_size, port)
    results = {}
    for method, sync in jobs:
        results[(method, sync)] = _one_step(method, sync, world_size, os.path.join(out_dir, f"{method}-{sync}-{rank}"))
    results["selection"] = _synced_selection(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# A global batch of 4 rows with 3 segments (layers) of integer scores (many ties), rows 0-1 on process 0 and rows 2-3
# on process 1, each shard padded to its own longest row, as DDP's collator pads them.
_ROW_LENGTHS = (5, 7, 9, 6)


def _selection_rows(rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (3, len(_ROW_LENGTHS), max(_ROW_LENGTHS)), generator=generator).float()
    width = max(_ROW_LENGTHS[r] for r in rows)
    valid = torch.tensor([[t < _ROW_LENGTHS[r] for t in range(width)] for r in rows])
    shard = scores[:, list(rows), :width]
    return shard.reshape(3, -1), valid.reshape(-1).expand(3, -1)


def _synced_selection(rank: int) -> dict[float, torch.Tensor]:
    """This process's real-token selections with the cross-process gather (the trainer has set up the group)."""
    from peft_depth.core.context import RoutingContext
    from peft_depth.tuners.dlo.selection import select_top_fraction

    context = RoutingContext(torch.nn.Identity())
    context.sync_across_processes = True
    scores, valid = _selection_rows(range(2 * rank, 2 * rank + 2))
    return {
        (f, keep_ties): select_top_fraction(scores, valid, f, context, keep_ties=keep_ties)[valid]
        for f in (0.1, 0.37, 0.5, 0.9)
        for keep_ties in (True, False)
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    jobs = [(method, sync) for method in sorted(_configs()) for sync in (True, False)]
    mp.start_processes(_worker, args=(2, _free_port(), jobs, str(out)), nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    return rank0, rank1


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


_REFERENCE: dict = {}


def _reference(method: str, tmp_path) -> tuple:
    """The one-process run on the whole global batch (computed once per method)."""
    if method not in _REFERENCE:
        _REFERENCE[method] = _one_step(method, True, 1, str(tmp_path))
    return _REFERENCE[method]


def test_synced_selection_equals_one_process_with_ties(two_process_results):
    """Integer scores tie everywhere: the two processes together select exactly the real tokens one process holding
    the whole batch selects, with the official rule (every tie at the threshold kept) and with exactly k (ties broken
    by the global order: segment, then row, then position)."""
    from peft_depth.tuners.dlo.selection import select_top_fraction

    rank0, rank1 = two_process_results
    scores, valid = _selection_rows(range(4))
    for (fraction, keep_ties), shard0 in rank0["selection"].items():
        expected = select_top_fraction(scores, valid, fraction, keep_ties=keep_ties)
        combined = torch.cat([shard0.view(3, -1), rank1["selection"][(fraction, keep_ties)].view(3, -1)], dim=1)
        assert torch.equal(combined, expected[valid].view(3, -1)), (fraction, keep_ties)
        k = max(1, math.ceil(fraction * int(valid.sum()) - 1e-9))
        if keep_ties:
            assert int(expected.sum()) >= k and bool((scores[valid & ~expected] < scores[expected].min()).all())
        else:
            assert int(expected.sum()) == k


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)).item() for n in b)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS")
@pytest.mark.parametrize("method", sorted(_configs()))
def test_two_processes_with_sync_equal_one_process(method, two_process_results, tmp_path):
    rank0, rank1 = two_process_results
    reference_grads, reference_log = _reference(method, tmp_path)
    grads0, log0 = rank0[(method, True)]
    grads1, _ = rank1[(method, True)]
    assert set(grads0) == set(reference_grads)
    for name in reference_grads:
        # DDP leaves the same averaged gradient on both processes
        torch.testing.assert_close(grads0[name], grads1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads0[name], reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    for key in [k for k in reference_log if k.startswith(("loss", "aux/"))]:
        assert log0[key] == pytest.approx(reference_log[key], rel=1e-4), key


@pytest.mark.parametrize("method", sorted(_configs()))
def test_without_sync_the_routing_gradient_differs(method, two_process_results, tmp_path):
    """Documents the difference: per-shard routing statistics change the routing part of the gradient."""
    rank0, _ = two_process_results
    reference_grads, _ = _reference(method, tmp_path)
    synced, _ = rank0[(method, True)]
    unsynced, _ = rank0[(method, False)]
    diff_unsynced = _max_rel_diff(unsynced, reference_grads)
    diff_synced = _max_rel_diff(synced, reference_grads)
    print(
        f"{method}: max relative gradient difference vs one process: sync {diff_synced:.2e}, no sync {diff_unsynced:.2e}"
    )
    # MoD's share is its distillation loss (coefficient 0.1, a KL near 1e-3 on these tiny models): a smaller gap
    gap = 1e-4 if method == "mod" else 1e-3
    assert diff_unsynced > gap > 1e-5 > diff_synced


def _block_skip_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Plain DDP (``find_unused_parameters=False``, as DepthSFTTrainer builds it) over a DLO block-skip model whose
    global top-k leaves process 1 (one row of 3 tokens) no token in some routed layer."""
    from datetime import timedelta

    import torch.distributed as dist
    from peft import get_peft_model
    from tiny_models import VOCAB, tiny_llama
    from torch.nn.parallel import DistributedDataParallel

    import peft_depth
    from peft_depth.trainer import set_sync_routing_stats

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    config = peft_depth.DLOConfig(
        task_type="CAUSAL_LM", r=4, lora_dropout=0.0, capacity=0.4, capacity_annealing_steps=0, skip_mode="block"
    )
    model = get_peft_model(tiny_llama(num_layers=4).train(), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking routers and LoRA: the scores no longer tie
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    set_sync_routing_stats(model, True)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (9, 6, 7, 3)]
    mine = rows[:3] if rank == 0 else rows[3:]
    width = max(len(r) for r in mine)
    ids = torch.zeros(len(mine), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(mine):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    executed, finished = [], 0
    for _ in range(2):
        out = ddp(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        layers = peft_depth.routing_stats(model)["dlo"]["default"]["layers"]
        executed.append([round(r["executed_fraction"] * r["num_tokens"]) for r in layers])
        (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
        model.zero_grad(set_to_none=True)
        finished += 1
    torch.save({"executed": executed, "finished": finished}, os.path.join(out_dir, f"block{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS")
def test_block_skip_trains_under_ddp_when_a_process_gets_no_token_of_a_layer(tmp_path):
    """With sync_routing_stats the batch-wide top-k can leave a process's shard no token of a layer the other process
    runs. The layer's parameters then got no gradient there, and DDP crashed (gloo) or hung (NCCL) in backward."""
    mp.start_processes(
        _block_skip_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    rank0, rank1 = (torch.load(tmp_path / f"block{r}.pt") for r in (0, 1))
    assert rank0["finished"] == rank1["finished"] == 2
    assert any(0 in step for step in rank1["executed"]), rank1  # the case this test is about did happen
    assert all(min(step) > 0 for step in rank0["executed"]), rank0


def _balance_off_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _join_process_group_environment(rank, world_size, port)
    from peft_depth.tuners.molex import MoLExConfig

    config = MoLExConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0, balance_loss_coef=0.0)
    trainer = make_trainer(
        config,
        os.path.join(out_dir, str(rank)),
        dataset=counting_dataset(16),
        max_steps=3,
        per_device_train_batch_size=2,
    )
    trainer.train()
    torch.save({"steps": trainer.state.global_step}, os.path.join(out_dir, f"balance_off{rank}.pt"))


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS")
def test_molex_trains_under_ddp_with_its_balance_loss_off(tmp_path):
    """MoLEx's gates learn only from the balance loss. With it off (coefficient 0) they get no gradient at all, and
    DDP without its unused-parameter search (what DepthSFTTrainer chose for depth adapters) failed at step 2."""
    mp.start_processes(
        _balance_off_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    assert [torch.load(tmp_path / f"balance_off{r}.pt")["steps"] for r in (0, 1)] == [3, 3]
