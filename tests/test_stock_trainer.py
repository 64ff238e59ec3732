"""A depth adapter inside a stock ``trl.SFTTrainer`` trains on the LM loss alone: it says so, once.

Auxiliary losses (MoLA/MoLEx balance, MoD distillation, DLO router loss) and DLO's capacity annealing only reach
training through ``DepthSFTTrainer`` (or a loop that reads ``peft_depth.aux_losses``); a stock trainer used to drop
them silently (a 100x coefficient gave an identical curve).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_llama
from trainer_fixtures import counting_dataset, make_trainer, method_configs, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

import peft_depth

WHAT_IS_DROPPED = {
    "mola": "balance_loss_coef",
    "molex": "balance_loss_coef",
    "mod": "distill_loss_coef",
    "dlo": "capacity annealing",
}


def _depth_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "peft-depth: this training loop drops" in str(w.message)]


def _stock_trainer(config, output_dir) -> SFTTrainer:
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    return SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=counting_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=config,
    )


@pytest.mark.parametrize("method", list(WHAT_IS_DROPPED))
def test_stock_sft_trainer_warns_once_naming_what_is_dropped(tmp_path, method):
    trainer = _stock_trainer(method_configs()[method](), str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = _depth_warnings(caught)
    assert len(messages) == 1, messages
    assert WHAT_IS_DROPPED[method] in messages[0] and "DepthSFTTrainer" in messages[0]


@pytest.mark.parametrize("method", ["mola", "dlo"])
def test_depth_sft_trainer_stays_quiet(tmp_path, method):
    trainer = make_trainer(method_configs()[method](), str(tmp_path), max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert _depth_warnings(caught) == []


def test_a_custom_loop_that_adds_the_aux_losses_stays_quiet_and_one_that_does_not_is_told():
    for reads_aux in (True, False):
        model = get_peft_model(tiny_llama(), peft_depth.MoLAConfig(num_experts=2, top_k=1, target_modules=["q_proj"]))
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                inputs = batch()
                loss = model(**inputs, labels=inputs["input_ids"]).loss
                if reads_aux:
                    loss = loss + sum(peft_depth.aux_losses(model).values())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():  # evaluation forwards never count as dropping anything
                model.eval()(**batch())
        assert len(_depth_warnings(caught)) == (0 if reads_aux else 1)


def test_zero_coefficients_leave_nothing_to_drop(tmp_path):
    config = peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, balance_loss_coef=0.0)
    trainer = _stock_trainer(config, str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert _depth_warnings(caught) == []


def test_the_readme_recipe_for_a_classifier_trains_with_the_aux_losses_and_stays_quiet(tmp_path):
    """README, 'Other task types': transformers' Trainer with compute_loss adding the auxiliary losses."""
    from datasets import Dataset
    from tiny_models import tiny_bert
    from transformers import Trainer, TrainingArguments

    import peft_depth.trainer

    class DepthTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            self.aux = sum(peft_depth.aux_losses(model).values())
            loss = loss + self.aux
            peft_depth.trainer.set_training_step(model, self.state.global_step)
            return (loss, outputs) if return_outputs else loss

    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 90, (6,), generator=generator).tolist(), "labels": i % 2} for i in range(8)]
    model = get_peft_model(tiny_bert(), peft_depth.MoLAConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = DepthTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="peft-depth: this training loop drops")
        trainer.train()
    assert float(trainer.aux) > 0  # MoLA's balance loss reached the loss


def test_dense_expansion_has_nothing_to_drop(tmp_path):
    """DLO with no router (routed_layers='none', LLaMA-Pro's dense expansion) trains on the LM loss alone: no router
    loss and no capacity to anneal, so a stock trainer drops nothing (it warned about both)."""
    config = peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="none")
    assert config.training_needs() == ([], [])
    trainer = _stock_trainer(config, str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert _depth_warnings(caught) == []
