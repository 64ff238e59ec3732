"""DepthSFTTrainer trains every depth method through TRL's SFTTrainer, with its auxiliary losses, logs and hooks."""

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_llama
from trainer_fixtures import GradCapture, assert_finite, counting_dataset, make_trainer, method_configs, train_logs

import peft_depth
from peft_depth import DepthSFTConfig
from peft_depth.core.aux import raw_aux_losses
from peft_depth.trainer import routing_health
from peft_depth.trainer.hooks import depth_tuners, weighted_aux_terms

METHODS = method_configs()


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads; on a loaded 2-core machine two threads run 5-15x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


HELD_OUT = counting_dataset(16, seed=123)


@torch.no_grad()
def lm_loss(trainer, dataset=HELD_OUT):
    """Mean next-token loss on held-out rows (same pattern, other runs), in eval mode, through the logits forward."""
    model = trainer.model
    was_training = model.training
    model.eval()
    batch = trainer.data_collator([{"input_ids": row["input_ids"]} for row in dataset])
    labels = batch.pop("labels")
    logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )
    model.train(was_training)
    return loss.item()


# ---------------------------------------------------------------- every method trains, logs and balances


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_and_logs_components(method, tmp_path):
    # MoD alone trains only norms, router and a gate that starts at 0 (a fresh adapter is the base model): it needs a
    # larger step to move visibly in 10 steps on a random base model.
    lr = 1e-1 if method == "mod" else 1e-2
    trainer = make_trainer(
        METHODS[method](), str(tmp_path), max_steps=10, gradient_accumulation_steps=2, learning_rate=lr
    )
    before_params = trainable(trainer.model)
    before_loss = lm_loss(trainer)
    trainer.train()
    aux_names = set(raw_aux_losses(trainer.model))  # of the last training forward
    assert aux_names
    after_loss = lm_loss(trainer)

    logs = train_logs(trainer)
    assert len(logs) == 10
    for entry in logs:
        assert_finite(entry)
        components = [k for k in entry if k.startswith("loss/") and k != "loss/lm"]
        assert {f"loss/{name}" for name in aux_names} == set(components)
        # Trainer's logged total (from the loss it back-propagated) equals the LM loss plus the weighted components
        assert entry["loss"] == pytest.approx(entry["loss/lm"] + sum(entry[k] for k in components), rel=1e-5)
        for name in aux_names:
            assert entry[f"loss/{name}"] > 0 and math.isfinite(entry[f"aux/{name}"])
    if peft_depth.routing_stats(trainer.model):
        assert any(k.startswith("routing/") for k in logs[-1]), logs[-1]

    after_params = trainable(trainer.model)
    unchanged = [n for n in before_params if torch.equal(before_params[n], after_params[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    routers = [n for n in before_params if any(key in n for key in ("router", "gate"))]
    assert routers or method == "mod"
    # held-out rows: for MoD this is "the trained adapter beats the untrained one (= the base model)"
    assert after_loss < before_loss - 0.02, (before_loss, after_loss)


def test_mola_logs_routing_health_names(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=2)
    trainer.train()
    entry = train_logs(trainer)[-1]
    assert {"loss/lm", "loss/routing", "aux/routing"} <= set(entry)
    # 2 then 4 experts: the usage entropy is between 0 and log(4), averaged over the four layers
    assert 0 < entry["routing/mola/usage_entropy_min"] <= entry["routing/mola/usage_entropy"] <= math.log(4)
    assert entry["loss/routing"] == pytest.approx(0.001 * entry["aux/routing"], rel=1e-5)


def test_routing_health_flattens_rows_and_summaries():
    stats = {
        "mola": {"default": [{"layer": 0, "usage_entropy": 0.5}, {"layer": 1, "usage_entropy": 1.5, "top_k": 2}]},
        "dlo": {
            "default": {
                "executed_fraction": 0.75,
                "step": 3,
                "layers": [
                    {"layer": 4, "executed_fraction": 0.75, "num_tokens": 9, "capacity": float("nan")},
                    {"layer": 9, "executed_fraction": 0.5, "new": True},
                ],
            }
        },
        "mod": {"default": {"layers": [2, 3], "gate": 0.25, "mean_weight": [0.5, 0.5]}},
    }
    health = routing_health(stats, drop_path_names={"default"})
    assert health == {
        "routing/mola/usage_entropy": 1.0,
        "routing/mola/usage_entropy_min": 0.5,
        "routing/dlo/executed_fraction": 0.75,
        "routing/dlo/skip_fraction/layer_4": 0.25,
        "routing/dlo/skip_fraction/layer_9": 0.5,
        "routing/dlo/skip_fraction": 0.375,
        "routing/mod/gate": 0.25,
    }


# ---------------------------------------------------------------- gradient accumulation and coefficient overrides


def test_aux_loss_scaled_for_gradient_accumulation_and_override_applies(tmp_path):
    """One step of 2 micro-batches: the gradient is d/dθ [Σ_mb CE_sum(mb) / N_tokens + c · Σ_mb aux(mb) / 2]."""
    config = peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, num_experts=4, top_k=2, lora_dropout=0.0)
    capture = GradCapture()
    trainer = make_trainer(
        config,
        str(tmp_path),
        dataset=counting_dataset(4),
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,
        routing_loss_coef=0.3,
        callbacks=[capture],
    )
    # Not a deepcopy: SFTTrainer's fused-head forward is a closure over the original model.
    reference = get_peft_model(tiny_llama(seed=1), config).train()
    reference.load_state_dict(trainer.model.state_dict())
    trainer.train()

    coef = 0.3
    micro = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in ((0, 1), (2, 3))]
    num_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        labels = batch.pop("labels")
        logits = reference(**batch).logits
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        aux = raw_aux_losses(reference)["routing"].value
        total = total + ce / num_tokens + coef * aux / 2
    total.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    (got,) = capture.grads
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    entry = train_logs(trainer)[-1]
    assert entry["loss/routing"] == pytest.approx(coef * entry["aux/routing"], rel=1e-4)
    assert entry["loss"] == pytest.approx(total.item(), rel=1e-5)


def test_evaluation_reports_the_same_components(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=1, per_device_eval_batch_size=8)
    metrics = trainer.evaluate(eval_dataset=counting_dataset(32, seed=5))
    assert {"eval_loss", "eval_loss/lm", "eval_loss/routing", "eval_routing/mola/usage_entropy"} <= set(metrics)
    # four equal batches: the mean of the per-batch totals is the sum of the per-component means
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss/lm"] + metrics["eval_loss/routing"], rel=1e-5)


def test_predict_leaves_the_next_evaluation_alone(tmp_path):
    # predict() never calls log(), where SFTTrainer empties its metric buffer: the prediction batches' loss parts and
    # routing statistics were averaged into the next evaluate(), whose eval_loss/lm + eval_loss/routing then no longer
    # added up to its eval_loss
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=1, per_device_eval_batch_size=4)
    held_out = counting_dataset(8, seed=5)
    first = trainer.evaluate(eval_dataset=held_out)
    trainer.predict(counting_dataset(8, seed=9, min_len=20, max_len=30))
    second = trainer.evaluate(eval_dataset=held_out)
    parts = [key for key in first if key.startswith(("eval_loss", "eval_routing"))]
    assert "eval_loss/lm" in parts and "eval_routing/mola/usage_entropy" in parts
    assert {key: second[key] for key in parts} == {key: first[key] for key in parts}


def test_zero_override_turns_the_aux_loss_off(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=1, routing_loss_coef=0.0)
    trainer.train()
    entry = train_logs(trainer)[-1]
    assert "loss/routing" not in entry
    assert entry["loss"] == pytest.approx(entry["loss/lm"], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(routing_loss_coef=-1.0), "routing_loss_coef"),
        (dict(distill_loss_coef=float("inf")), "distill_loss_coef"),
        (dict(router_loss_coef=-0.1), "router_loss_coef"),
        (dict(gate_learning_rate=0.0), "gate_learning_rate"),
        (dict(gate_weight_decay=-1.0), "gate_weight_decay"),
    ],
)
def test_bad_depth_config_values_name_the_field(kwargs, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        DepthSFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, **kwargs)


def test_full_logits_path_gives_the_fused_head_gradients(tmp_path):
    """An adapter that needs real logits trains through the model's own head with the same loss and gradients."""
    results = []
    for full_logits in (False, True):
        capture = GradCapture()
        trainer = make_trainer(
            METHODS["mola"](),
            str(tmp_path / str(full_logits)),
            max_steps=1,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            max_grad_norm=0.0,
            callbacks=[capture],
        )
        if full_logits:
            (tuner,) = depth_tuners(trainer.model)
            tuner.needs_full_logits = True
        trainer.train()
        results.append((train_logs(trainer)[-1], capture.grads[0]))
    (fused_log, fused), (logits_log, via_logits) = results
    assert logits_log["loss"] == pytest.approx(fused_log["loss"], rel=1e-5)
    assert logits_log["mean_token_accuracy"] == pytest.approx(fused_log["mean_token_accuracy"])
    # SFTTrainer's other metrics, which the logits path computes itself
    assert logits_log["entropy"] == pytest.approx(fused_log["entropy"], rel=1e-5)
    assert logits_log["num_tokens"] == fused_log["num_tokens"] > 0
    for name in fused:
        torch.testing.assert_close(via_logits[name], fused[name], rtol=1e-4, atol=1e-7, msg=name)


def _token_mean_nll(outputs, labels, num_items_in_batch=None):
    logits, targets = outputs.logits[:, :-1].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("method", ["mola", "dlo"])
@pytest.mark.parametrize("setting", ["label_smoothing", "compute_loss_func"])
def test_a_loss_from_full_logits_keeps_the_auxiliary_losses_of_its_own_forward(setting, method, tmp_path):
    """With label smoothing or a compute_loss_func, SFTTrainer computes the loss from full logits and then runs a
    second, no-grad forward for its metrics; the balance loss (MoLA) and the router loss (DLO) must come from the
    forward that carries the gradient, not from that one (they had no gradient, or were missing)."""
    overrides = {"label_smoothing_factor": 0.1} if setting == "label_smoothing" else {}
    with warnings.catch_warnings():
        # TRL 1.16 deprecates label smoothing in SFTTrainer (removal in 2.0): the user's setting, which this test needs
        warnings.filterwarnings("ignore", message="`label_smoothing_factor` is deprecated", category=FutureWarning)
        trainer = make_trainer(METHODS[method](), str(tmp_path), max_steps=1, **overrides)
    if setting == "compute_loss_func":
        trainer.compute_loss_func = _token_mean_nll
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # as Trainer's loop sets it
    inputs = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)  # the same dropout masks in both forwards
    loss = trainer.compute_loss(model, dict(inputs))
    # the same loss, computed by hand from one forward
    torch.manual_seed(0)
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
    if setting == "compute_loss_func":
        expected = _token_mean_nll(outputs, inputs["labels"])
    else:
        expected = trainer.label_smoother(outputs, inputs["labels"], shift_labels=True)
    terms = weighted_aux_terms(model, trainer._aux_overrides)  # of the forward just above
    assert terms and all(term.weighted.requires_grad for term in terms.values()), terms
    expected = expected + sum(term.weighted for term in terms.values())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(loss, trainable), torch.autograd.grad(expected, trainable)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif("mod" not in METHODS, reason="MoD not present")
def test_mod_log_prob_mixing_trains_through_the_logits_path(tmp_path):
    """MoD's log-probability mixing needs real logits: the adapter says so and the trainer skips TRL's fused head."""
    from peft_depth.tuners.mod import MoDConfig

    trainer = make_trainer(MoDConfig(task_type="CAUSAL_LM", mix_space="log_probs"), str(tmp_path), max_steps=3)
    (tuner,) = depth_tuners(trainer.model)
    assert tuner.needs_full_logits
    with trainer.model.disable_adapter():
        assert not tuner.needs_full_logits
    trainer.train()
    entry = train_logs(trainer)[-1]
    assert math.isfinite(entry["loss"]) and "loss/distill" in entry
    assert entry["loss"] == pytest.approx(entry["loss/lm"] + entry["loss/distill"], rel=1e-5)


# ---------------------------------------------------------------- plain peft adapters


def test_plain_lora_is_just_sft(tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(config, str(tmp_path), max_steps=6)
    before = lm_loss(trainer)
    trainer.train()
    assert lm_loss(trainer) < before
    entry = train_logs(trainer)[-1]
    assert not any(k.startswith(("loss/", "aux/", "routing/")) for k in entry)
    assert not depth_tuners(trainer.model)


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method, tmp_path):
    results = []
    for checkpointing in (False, True):
        capture = GradCapture()
        trainer = make_trainer(
            METHODS[method](),
            str(tmp_path / str(checkpointing)),
            max_steps=1,
            gradient_checkpointing=checkpointing,
            max_grad_norm=0.0,
            callbacks=[capture],
        )
        trainer.train()
        results.append((train_logs(trainer)[-1], capture.grads[0]))
    (log_plain, grads_plain), (log_ckpt, grads_ckpt) = results
    for key in [k for k in log_plain if k.startswith(("loss", "aux/"))]:
        assert log_ckpt[key] == pytest.approx(log_plain[key], rel=1e-5), key
    assert set(grads_plain) == set(grads_ckpt)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- hooks: sync flag, step, optimizer groups


def test_sync_routing_stats_reaches_every_tuner(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=1, sync_routing_stats=True)
    (tuner,) = depth_tuners(trainer.model)
    assert tuner.routing_context.sync_across_processes
    # single process: syncing is a no-op, training runs as usual
    assert not tuner.routing_context.syncing
    trainer.train()


def test_training_step_hook_follows_global_step_and_resume(tmp_path):
    trainer = make_trainer(
        METHODS["mola"](),
        str(tmp_path),
        max_steps=3,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    (tuner,) = depth_tuners(trainer.model)
    seen = []
    tuner.set_training_step = seen.append
    trainer.train()
    assert seen == [0, 0, 1, 1, 2, 2]

    resumed = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=3, gradient_accumulation_steps=2)
    (tuner,) = depth_tuners(resumed.model)
    seen = []
    tuner.set_training_step = seen.append
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen == [2, 2]


@pytest.mark.skipif("dlo" not in METHODS, reason="DLO not present")
def test_dlo_capacity_anneals_with_the_trainer_global_step(tmp_path):
    from peft_depth.tuners.dlo import DLOConfig

    config = DLOConfig(task_type="CAUSAL_LM", capacity=0.5, capacity_annealing_steps=4)
    trainer = make_trainer(config, str(tmp_path), max_steps=4, gradient_accumulation_steps=2)
    trainer.train()
    # the step-k log shows the capacity of its micro-batches, taken before optimizer step k (global_step k-1)
    logged = [e["routing/dlo/capacity_target"] for e in train_logs(trainer)]
    assert logged == pytest.approx([1.0, 0.875, 0.75, 0.625])


def test_optimizer_groups_hook_and_gate_overrides(tmp_path):
    trainer = make_trainer(
        METHODS["mola"](), str(tmp_path), max_steps=1, gate_learning_rate=0.1, gate_weight_decay=0.5, weight_decay=0.01
    )
    (tuner,) = depth_tuners(trainer.model)
    routers = [p for n, p in tuner.named_parameters() if "mola_router" in n]
    first_a = next(p for n, p in tuner.named_parameters() if "mola_A" in n)
    # a method exposing its gates (here: MoLA's routers stand in) and one parameter at a fixed lr
    tuner.depth_optimizer_groups = lambda lr, wd: [
        {"name": "gate", "params": routers},
        {"name": "slow", "params": [first_a], "lr": lr / 10},
    ]
    trainer.train()
    groups = trainer.optimizer.param_groups
    by_name = {g.get("name"): g for g in groups}
    assert by_name["gate"]["lr"] == 0.1 and by_name["gate"]["weight_decay"] == 0.5
    assert by_name["slow"]["lr"] == pytest.approx(1e-3) and by_name["slow"]["weight_decay"] == 0.01
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.skipif("molex" not in METHODS, reason="MoLEx not present")
def test_molex_gates_get_their_own_group(tmp_path):
    from peft_depth.tuners.molex import MoLExConfig

    config = MoLExConfig(task_type="CAUSAL_LM", r=4, gate_lr=0.05, gate_weight_decay=0.0)
    trainer = make_trainer(config, str(tmp_path), max_steps=1, weight_decay=0.1)
    trainer.train()
    (gate,) = [g for g in trainer.optimizer.param_groups if g.get("name") == "gate"]
    assert gate["lr"] == 0.05 and gate["weight_decay"] == 0.0
    # the trainer-level override wins over the adapter config's choice
    trainer = make_trainer(config, str(tmp_path), max_steps=1, gate_learning_rate=0.2, gate_weight_decay=0.01)
    trainer.create_optimizer()
    (gate,) = [g for g in trainer.optimizer.param_groups if g.get("name") == "gate"]
    assert gate["lr"] == 0.2 and gate["weight_decay"] == 0.01
    gate_ids = {id(p) for p in gate["params"]}
    assert gate_ids and all(
        "gate" in n or "alpha" in n for n, p in trainer.model.named_parameters() if id(p) in gate_ids
    )


def test_optimizer_groups_reject_a_parameter_listed_twice(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=1)
    (tuner,) = depth_tuners(trainer.model)
    router = next(p for n, p in tuner.named_parameters() if "mola_router" in n)
    tuner.depth_optimizer_groups = lambda lr, wd: [{"params": [router]}, {"name": "gate", "params": [router]}]
    with pytest.raises(ValueError, match="two groups"):
        trainer.create_optimizer()


# ---------------------------------------------------------------- resume and save


RESUME_CONFIGS = dict(METHODS)
if "dlo" in RESUME_CONFIGS:
    # capacity annealing within the run, so the resumed run must pick up the capacity at step 2
    from peft_depth.tuners.dlo import DLOConfig

    RESUME_CONFIGS["dlo"] = lambda: DLOConfig(task_type="CAUSAL_LM", capacity=0.5, capacity_annealing_steps=3)


@pytest.mark.parametrize("method", sorted(RESUME_CONFIGS))
def test_resume_continues_the_same_trajectory(method, tmp_path):
    """4 steps straight vs 2 + resume from checkpoint-2: same parameters and losses (optimizer, scheduler, RNG of the
    adapter dropout, DLO's annealed capacity)."""

    def run():
        return make_trainer(
            RESUME_CONFIGS[method](),
            str(tmp_path),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            lr_scheduler_type="linear",
        )

    full = run()
    full.train()
    resumed = run()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    final_full, final_resumed = trainable(full.model), trainable(resumed.model)
    for name in final_full:
        torch.testing.assert_close(final_resumed[name], final_full[name], rtol=1e-5, atol=1e-7, msg=name)
    logs_full = {e["step"]: e for e in train_logs(full)}
    logs_resumed = {e["step"]: e for e in train_logs(resumed)}
    assert {3, 4} <= set(logs_resumed)
    for step in (3, 4):
        for key in [k for k in logs_full[step] if k.startswith(("loss", "routing/"))]:
            assert logs_resumed[step][key] == pytest.approx(logs_full[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_tuner_checkpoint_state_is_saved_and_restored(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=2, save_strategy="steps", save_steps=2)
    (tuner,) = depth_tuners(trainer.model)
    tuner.depth_checkpoint_state = lambda: {"calls": torch.tensor(7), "capacities": {3: 0.75}}
    tuner.load_depth_checkpoint_state = lambda state: None
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "depth_tuner_state.pt").exists()

    resumed = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=3)
    (tuner,) = depth_tuners(resumed.model)
    received = []
    tuner.load_depth_checkpoint_state = received.append
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(received) == 1
    assert received[0]["capacities"] == {3: 0.75} and int(received[0]["calls"]) == 7


def test_saved_adapter_reloads_with_peft(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch.pop("labels")
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**batch).logits, expected)


def test_saved_folder_has_no_pickle_and_the_training_arguments_as_json(tmp_path):
    trainer = make_trainer(METHODS["mola"](), str(tmp_path), max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "training_args.bin" not in saved and not any(name.endswith((".bin", ".pt", ".pkl")) for name in saved)
    arguments = json.loads((tmp_path / "adapter" / "training_args.json").read_text())
    assert arguments["max_steps"] == 1 and arguments["sync_routing_stats"] is False


def test_trainer_push_to_hub_uploads_the_peft_depth_card(tmp_path, monkeypatch):
    """Trainer.push_to_hub writes TRL's SFT card after saving; the pushed README is still peft-depth's card."""
    from huggingface_hub import ModelCard, constants

    from peft_depth.hub.local_hub import LocalHub
    from peft_depth.hub.model_card import CARD_MARKER

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub = LocalHub()
    with hub.activate():
        trainer = make_trainer(METHODS["mola"](), str(tmp_path / "out"), max_steps=1, hub_model_id="org/mola-sft")
        trainer.train()
        trainer.push_to_hub()
        files = hub.files("org/mola-sft")
    assert hub.unhandled == []
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "training_args.json"} <= set(files)
    assert "training_args.bin" not in files
    card = ModelCard(files["README.md"].decode())
    assert CARD_MARKER in card.text and 'from_pretrained("org/mola-sft")' in card.text
    assert {"mola", "peft-depth", "trl", "sft"} <= set(card.data.tags)  # TRL's metadata kept


@pytest.mark.skipif("mod" not in METHODS, reason="MoD not present")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_full_logits_path_distils_the_labelled_positions_as_a_labelled_call_does(training, tmp_path):
    """The full-logits loss calls the model without ``labels`` (it computes the loss itself); MoD then distilled every
    real token in training (prompt tokens included) and nothing in eval. It must distil what a labelled call does."""
    from peft_depth.tuners.mod import MoDConfig

    trainer = make_trainer(MoDConfig(task_type="CAUSAL_LM", mix_space="log_probs"), str(tmp_path), max_steps=1)
    model = trainer.model.train(training)
    inputs = dict(next(iter(trainer.get_train_dataloader())))
    inputs["labels"] = inputs["labels"].clone()
    inputs["labels"][:, :5] = -100  # a prompt: its positions carry no label
    trainer._logits_path_loss(model, inputs, None, "train" if training else "eval")
    via_trainer = peft_depth.aux_losses(model)["distill"]
    model(**inputs, use_cache=False)
    labelled_call = peft_depth.aux_losses(model)["distill"]
    torch.testing.assert_close(via_trainer, labelled_call, rtol=0, atol=0)
    model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)  # the old behaviour, for contrast
    unlabelled = peft_depth.aux_losses(model).get("distill")
    assert unlabelled is None if not training else not torch.equal(unlabelled, labelled_call)


@pytest.mark.parametrize(
    "method, config_field, override, loss_name",
    [
        ("mod", "distill_loss_coef", "distill_loss_coef", "distill"),
        ("dlo", "router_loss_coef", "router_loss_coef", "router"),
    ],
)
def test_an_override_weights_a_loss_the_adapter_config_switches_off(
    method, config_field, override, loss_name, tmp_path
):
    """MoD and DLO skip computing a loss whose configured coefficient is 0; a DepthSFTConfig override of 0.5 must
    still train with it (it was silently left out)."""
    if method not in METHODS:
        pytest.skip(f"{method} not present")
    config = METHODS[method]()
    setattr(config, config_field, 0.0)
    trainer = make_trainer(config, str(tmp_path), max_steps=1, **{override: 0.5})
    trainer.train()
    entry = train_logs(trainer)[-1]
    assert entry[f"loss/{loss_name}"] == pytest.approx(0.5 * entry[f"aux/{loss_name}"], rel=1e-5)
    assert entry[f"aux/{loss_name}"] > 0
    assert entry["loss"] == pytest.approx(entry["loss/lm"] + entry[f"loss/{loss_name}"], rel=1e-5)


@pytest.mark.skipif("mod" not in METHODS, reason="MoD not present")
def test_the_trainer_overrides_hold_for_its_own_run_only(tmp_path):
    """A DepthSFTConfig override of 0 stayed on the tuners after training: the user's own loop afterwards
    (``out.loss + sum(aux_losses(model).values())``) then trained without the loss the adapter config switches on."""
    from peft_depth.tuners.mod import MoDConfig

    trainer = make_trainer(
        MoDConfig(task_type="CAUSAL_LM", distill_loss_coef=0.5), str(tmp_path), max_steps=1, distill_loss_coef=0.0
    )
    trainer.train()
    assert "loss/distill" not in train_logs(trainer)[-1]  # off for the run
    model = trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    model(**inputs)
    assert float(peft_depth.aux_losses(model)["distill"]) > 0  # the adapter's own coefficient again


def test_an_inactive_adapter_with_its_loss_off_leaves_ddp_unused_parameter_search_off(tmp_path):
    """Only active adapters decide: the search on (for an inactive adapter's switched-off loss) made DDP mark the
    active MoLEx gates ready twice."""
    trainer = make_trainer(peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=4), str(tmp_path), max_steps=1)
    trainer.model.add_adapter("b", peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=4, balance_loss_coef=0.0))
    handlers = trainer._build_accelerator_args().get("kwargs_handlers", [])
    assert [h.find_unused_parameters for h in handlers if hasattr(h, "find_unused_parameters")] == [False]
    trainer.model.set_adapter("b")
    handlers = trainer._build_accelerator_args().get("kwargs_handlers", [])
    assert [h.find_unused_parameters for h in handlers if hasattr(h, "find_unused_parameters")] == [True]
