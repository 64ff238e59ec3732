"""The shared core: routers, balance-loss statistics, layer-stack discovery, the padding-mask tracker."""

import math

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta
from torch import nn

from peft_depth.core.context import RoutingContext
from peft_depth.core.layer_stack import find_final_norm, find_layer_stack
from peft_depth.core.routing import masked_routing_statistics, route_top_k, switch_balance_loss, usage_entropy


def test_top_k_routing_renormalises_in_fp32():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]], dtype=torch.bfloat16)
    decision = route_top_k(logits, 2)
    assert decision.probs.dtype == decision.gates.dtype == torch.float32
    probs = torch.softmax(logits.float(), -1)
    expected_first = probs[0, :2] / probs[0, :2].sum()
    torch.testing.assert_close(decision.gates[0, :2], expected_first)
    assert decision.gates[0, 2:].abs().sum() == 0
    torch.testing.assert_close(decision.gates.sum(-1), torch.ones(2))
    assert decision.top_indices[1, 0] == 2


def test_top_k_equal_to_experts_is_soft_routing():
    logits = torch.randn(5, 3)
    decision = route_top_k(logits, 3)
    torch.testing.assert_close(decision.gates, torch.softmax(logits, -1))


def test_balance_statistics_exclude_padding_and_add_like_concatenation():
    torch.manual_seed(0)
    logits_a, logits_b = torch.randn(6, 4), torch.randn(6, 4)
    mask = torch.tensor([False, True, True, True, False, True])
    a = masked_routing_statistics(route_top_k(logits_a, 2), mask)
    b = masked_routing_statistics(route_top_k(logits_b, 2), mask)
    concatenated = masked_routing_statistics(route_top_k(torch.cat([logits_a[mask], logits_b[mask]]), 2), None)
    combined = a + b
    torch.testing.assert_close(combined.prob_sums, concatenated.prob_sums)
    torch.testing.assert_close(combined.assignment_counts, concatenated.assignment_counts)
    assert combined.num_tokens.item() == 8
    loss = switch_balance_loss(combined)
    expected = 4 * (combined.assignment_counts / 16 * combined.prob_sums / 8).sum()
    torch.testing.assert_close(loss, expected)


def test_uniform_router_has_unit_balance_loss_and_max_entropy():
    decision = route_top_k(torch.zeros(8, 4), 4)
    stats = masked_routing_statistics(decision, None)
    torch.testing.assert_close(switch_balance_loss(stats), torch.tensor(1.0))
    torch.testing.assert_close(usage_entropy(stats.expert_fraction), torch.tensor(math.log(4)))


def test_balance_loss_gradient_flows_to_probabilities_only():
    logits = torch.randn(6, 3, requires_grad=True)
    stats = masked_routing_statistics(route_top_k(logits, 1), None)
    assert not stats.assignment_counts.requires_grad
    switch_balance_loss(stats).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "factory, path, backbone, norm",
    [
        (tiny_llama, "model.layers", "model", "norm"),
        (tiny_gpt2, "transformer.h", "transformer", "ln_f"),
        (tiny_bert, "bert.encoder.layer", "bert", None),
        (tiny_roberta, "roberta.encoder.layer", "roberta", None),
    ],
)
def test_layer_stack_found_across_architectures(factory, path, backbone, norm):
    model = factory()
    stack = find_layer_stack(model)
    assert stack.path == path and stack.num_layers == 4 and stack.backbone_path == backbone
    assert stack.layer_index(f"{path}.2.attention.self.query") == 2
    assert stack.layer_index(f"base_model.model.{path}.3") == 3
    assert stack.layer_index("lm_head") is None
    found = find_final_norm(model, stack)
    assert (found[2] if found else None) == norm


def test_layer_stack_generic_search_and_absence():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(4, 2)

    stack = find_layer_stack(Net())
    assert stack.path == "blocks" and stack.num_layers == 3
    assert find_layer_stack(nn.Sequential(nn.Linear(2, 2))) is None


def test_routing_context_tracks_mask_of_latest_call_with_cache_offset():
    model = tiny_llama()
    context = RoutingContext(model)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    model(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=mask)
    assert context.flat_mask((2, 4, 32)).tolist() == [False, True, True, True] + [True] * 4
    # decoding one token with a cache: the mask covers past + current, the layer sees only the current token
    assert context.flat_mask((2, 1, 32)).tolist() == [True, True]
    # shapes that do not line up (a gathered subset of tokens) mean "all real"
    assert context.flat_mask((3, 4, 32)) is None
    model(input_ids=torch.ones(2, 4, dtype=torch.long))
    assert context.flat_mask((2, 4, 32)) is None
    assert not context.syncing
    t = torch.ones(2)
    assert context.reduce_sum(t) is t


@pytest.mark.parametrize("method", ["mod", "dlo"])
def test_the_state_marker_answers_weight_lookups_and_peft_fsdp_wrap_policy(method):
    """MoD and DLO without LoRA register a parameter-free marker layer. peft's FSDP auto-wrap policy (what
    transformers' Trainer installs for a PEFT model under FSDP v1) asks every module for its ``weight``; the marker
    is its own base layer, and the lookup recursed forever."""
    from peft import get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy

    from peft_depth import DLOConfig, MoDConfig
    from peft_depth.core.state_marker import TunerStateMarker

    config = MoDConfig(num_late_layers=2) if method == "mod" else DLOConfig(expand_every=2)
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(tiny_llama(), config)
    markers = [module for module in model.modules() if isinstance(module, TunerStateMarker)]
    assert len(markers) == 1
    assert getattr(markers[0], "weight", None) is None and getattr(markers[0], "bias", None) is None
    policy = fsdp_auto_wrap_policy(model)
    wrapped = [
        name for name, module in model.named_modules() if policy(module=module, recurse=False, nonwrapped_numel=1)
    ]
    assert wrapped  # the policy ran over every module and chose the trainable leaves
