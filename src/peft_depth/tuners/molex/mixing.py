"""MoLEx's mixture of a block with the expert layer its gate picks: routing, expert passes, combination, records."""

from __future__ import annotations

from typing import Any

import torch

from ...core.distributed import calls_on_every_process, fsdp_gathered
from ...core.layer_call import BlockCall
from ...core.layer_stack import text_config
from ...core.nonfinite import check_routing_scores
from ...core.output_capture import output_recording_paused
from .config import MoLExConfig
from .expert_cache import expert_cache_state
from .layer import SHARED_GATE_KEY, layer_key
from .routing import LayerRecord, MoLExDecision, decide, layer_statistics

__all__ = ["MoLExMixing"]


class MoLExMixing:
    """Mixin of ``MoLExModel``: one MoLEx layer's forward, ``α·u_i + (1−α)·u_j``, given the adapter's plan
    (``self._plans``), its gates and α, and the block's original forward (``self._original_forward``)."""

    def _mix(self, adapter: str, index: int, original, call: BlockCall) -> Any:
        """Block ``index``'s output mixed with the expert layer its gate picks: ``α·u_i + (1−α)·u_j``."""
        config: MoLExConfig = self.peft_config[adapter]
        self._check_cache_allowed(config, call, index)
        decision = self._route(adapter, index, call.hidden)
        # Expert calls must never write the model's cache: without token routing they get none; with it, each
        # expert pass (index, j) gets its own slot in a side cache.
        expert_state = None
        if config.routing == "token" and call.cache is not None:
            key = (id(self), adapter, index)
            expert_state = expert_cache_state(call.cache, key, text_config(self.model), call.past_length(index))
        # The official code runs the chosen layer as a call of its own even when it is this one: in training its
        # dropout draws differ from the own pass's. It runs without a cache (the own pass fills the model's), so not
        # when a forward continues from cached positions, which it would not see (read before the own pass adds
        # this call's).
        second_pass = (
            config.self_choice_second_pass
            and self.layer_stack.layers[index].training
            and (call.cache is None or call.past_length(index) == 0)
        )
        own = original(call.hidden, **call.arguments)
        own_hidden = _first(own)
        # Sharded blocks: every process also runs the layers only other processes chose (their shards are gathered
        # collectively), and mixes as one process holding all rows would.
        experts = calls_on_every_process(self.layer_stack.layers, decision.experts, call.hidden.device)
        with output_recording_paused():  # expert passes are no layer of this forward: one record per layer
            other = self._expert_outputs(index, call, decision, experts, own_hidden, expert_state, second_pass)
        if expert_state is not None:
            expert_state.append(call.hidden, call.arguments)
        mixed, alpha = self._combine(adapter, index, own_hidden, other, decision, experts, second_pass)
        self._record(adapter, index, decision, alpha)
        return (mixed, *own[1:]) if isinstance(own, tuple) else mixed

    @staticmethod
    def _check_cache_allowed(config: MoLExConfig, call: BlockCall, index: int) -> None:
        if config.routing != "token" and call.cache is not None and call.past_length(index) > 0:
            raise ValueError(
                f"MoLEx routing={config.routing!r} chooses the expert from all tokens of the input, so it cannot "
                "continue from a KV cache (the choice would change with every new token). Generate with "
                "`use_cache=False` (PeftModel.generate does this for you), or use routing='token'."
            )

    def _route(self, adapter: str, index: int, hidden: torch.Tensor) -> MoLExDecision:
        """The gate's decision for the tokens of block ``index`` (non-finite scores handled by the config's policy)."""
        config: MoLExConfig = self.peft_config[adapter]
        gates = self.molex_gate[adapter]
        gate = gates[SHARED_GATE_KEY] if config.shared_gate else gates[layer_key(index)]
        logits = gate(hidden.reshape(-1, hidden.shape[-1]))
        nonfinite = check_routing_scores(logits, config.nonfinite_routing, f"MoLEx adapter {adapter!r}, layer {index}")
        return decide(
            logits,
            self._plans[adapter].candidate_masks[index].to(logits.device),
            config.routing,
            (hidden.shape[0], hidden.shape[1]),
            self.routing_context.flat_mask(hidden.shape),
            nonfinite,
            index,
            self.routing_context,
        )

    def _expert_outputs(
        self, index, call: BlockCall, decision: MoLExDecision, experts, own_hidden, expert_state, second_pass: bool
    ):
        """``u_j`` per token: the output of the expert layer it chose (where it chose block ``index``: a second pass
        of it with ``second_pass``, else its own output).

        One pass per layer of ``experts`` (the distinct chosen layers; with sharded blocks, those of every process);
        with per-sequence choices, a layer only runs on the rows that chose it.
        """
        batch, seq = call.hidden.shape[0], call.hidden.shape[1]
        other = own_hidden
        layers = self.layer_stack.layers
        for j in experts:
            if j == index and not second_pass:
                continue
            # block j's own forward, past its hooks (it is no layer of this forward), but with its FSDP shards gathered
            expert_forward = fsdp_gathered(layers[j], self._original_forward(j))
            rows = None if decision.row_choice is None else decision.row_choice == j
            if expert_state is not None and j != index:
                out_j = self._run_expert_with_cache(expert_forward, j, call, expert_state)
            elif rows is not None and 0 < int(rows.sum()) < batch:
                out_j = _run_on_rows(expert_forward, call.hidden, call.without_cache(), rows)
                other = torch.where(rows.view(batch, 1, 1), out_j, other)
                continue
            else:
                out_j = _first(expert_forward(call.hidden, **call.without_cache()))
            selected = (decision.chosen == j).view(batch, seq, 1)
            other = torch.where(selected, out_j.to(other.dtype), other)
        return other

    def _combine(
        self,
        adapter: str,
        index: int,
        own_hidden,
        other,
        decision: MoLExDecision,
        experts: list[int],
        second_pass: bool,
    ):
        """``(α·u_i + (1−α)·u_j, α)``; tokens on the base path keep ``u_i`` exactly."""
        config: MoLExConfig = self.peft_config[adapter]
        batch, seq = own_hidden.shape[0], own_hidden.shape[1]
        if config.learn_alpha:
            alpha = self.molex_alpha[adapter](index)
        else:
            alpha = torch.tensor(self._plans[adapter].alpha, device=own_hidden.device)
        mixes = second_pass or any(j != index for j in experts)
        if config.straight_through_gate:
            # forward value unchanged (ratio 1), gradient of the chosen probability reaches the gate
            chosen_prob = decision.probs.gather(1, decision.chosen[:, None])
            detached = chosen_prob.detach()
            ratio = torch.where(detached > 0, chosen_prob / detached.clamp_min(1e-30), torch.ones_like(detached))
            other = other * ratio.view(batch, seq, 1).to(other.dtype)
            mixes = True
        if not mixes:
            # every token chose its own layer: α·u_i + (1−α)·u_i is u_i, computed once
            return own_hidden, alpha
        alpha_cast = alpha.to(own_hidden.dtype)
        mixed = alpha_cast * own_hidden + (1 - alpha_cast) * other
        return torch.where(decision.base_path.view(batch, seq, 1), own_hidden, mixed), alpha

    def _record(self, adapter: str, index: int, decision: MoLExDecision, alpha: torch.Tensor) -> None:
        """Keep this layer's statistics in this thread's forward context (published last: gradient-checkpoint
        recomputation may stop part-way through a forward)."""
        config: MoLExConfig = self.peft_config[adapter]
        prob_sums, counts, num_tokens = layer_statistics(decision)
        if config.routing == "batch_vote":
            chosen: int | list[int] = decision.experts[0]
        elif config.routing == "sequence":
            chosen = decision.row_choice.tolist()
        else:
            chosen = [j for j in decision.experts if counts[j] > 0]
        record = LayerRecord(
            prob_sums=prob_sums,
            counts=counts,
            num_tokens=num_tokens,
            num_candidates=len(self._plans[adapter].candidates[index]),
            alpha=float(alpha.detach()),
            chosen=chosen,
            base_path=decision.base_path,
        )
        records = self._records
        records[adapter] = {**records.get(adapter, {}), index: record}

    @staticmethod
    def _run_expert_with_cache(expert_forward, j: int, call: BlockCall, state) -> torch.Tensor:
        """Block j on the call's input with its own side-cache slot, after catching up on positions it has not seen."""
        expert_kwargs = call.with_cache(state.cache)
        seen = state.cache.get_seq_length(j)
        if seen < state.past_length:
            caught = state.catch_up_kwargs(seen, state.past_length, expert_kwargs)
            expert_forward(state.inputs[:, seen:], **caught)
        return _first(expert_forward(call.hidden, **expert_kwargs))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _run_on_rows(forward, hidden: torch.Tensor, kwargs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """Run ``forward`` on the selected sequences only and scatter back (other rows: zeros, overwritten by caller)."""
    batch = hidden.shape[0]
    index = rows.nonzero().squeeze(-1)

    def select(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(select(v) for v in value)
        return value

    out = _first(forward(hidden.index_select(0, index), **{k: select(v) for k, v in kwargs.items()}))
    full = torch.zeros_like(hidden, dtype=out.dtype)
    return full.index_copy(0, index, out)
