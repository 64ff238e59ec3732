"""DLO's MLP skip inside a decoder layer: where the MLP branch is, and the shadows that run it on selected tokens.

``DLOBlock`` (``layer.py``) installs these on the decoder layer for ``skip_mode='mlp'`` (see ``core.rewiring``:
instance attributes that hide the registered modules without changing any state-dict key):

- ``mlp`` -> ``SkipMLP``: in eval it gathers the selected tokens, runs the real MLP on those alone and scatters the
  scaled result back (skipped tokens get exactly zero: the residual passes through); in training it runs every token,
  because the router labels need every token's MLP output, and zeroes the unselected ones.
- the pre-MLP norm -> ``ResidualTap``: records the residual stream ``h'`` entering the MLP, for the cosine labels
  (a layer whose MLP reads ``h'`` unnormed, OLMo-2, has ``SkipMLP`` record it);
- a post-MLP norm, where the layer has one (Gemma-2/3, OLMo-2, GLM-4) -> ``BranchOutputGate``: the mask, the scale
  and the labels apply after that norm, to the branch that joins the residual (``find_mlp_branch``).

Each shadow reads the plan of its block's call in progress on the calling thread (``DLOBlock.current_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.output_capture import records_outputs_inside_layers
from .delegating import Delegating
from .forward_state import RoutingPlan

if TYPE_CHECKING:
    from .layer import DLOBlock

__all__ = [
    "BranchOutputGate",
    "MLPBranch",
    "ResidualTap",
    "SkipMLP",
    "find_mlp_branch",
    "gate_branch_output",
]


#: Names of a decoder layer's MLP.
MLP_NAMES = ("mlp", "feed_forward")
#: Names of a norm applied to the MLP's output before it joins the residual stream (Gemma-2/3, OLMo-2/3, GLM-4).
POST_MLP_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm")
#: Names of the norm that feeds the MLP in a plain pre-norm layer (Llama/Qwen/Mistral, GPT-NeoX, GPT-2).
PRE_MLP_NORM_NAMES = ("post_attention_layernorm", "ln_2")


@dataclass(frozen=True)
class MLPBranch:
    """Where a decoder layer's MLP branch is: ``h' + post_norm(mlp(pre_norm(h')))``, the residual stream ``h'``.

    ``pre_norm`` is None when the MLP reads ``h'`` itself (OLMo-2); ``post_norm`` is None when the MLP's output joins
    the residual as it is (Llama). DLO's mask and scale, and its cosine labels, apply to the branch's output: after
    ``post_norm``, which would otherwise cancel a per-token scale (an RMSNorm is invariant to it).
    """

    mlp: str
    pre_norm: str | None
    post_norm: str | None


def _module_named(layer: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if isinstance(getattr(layer, name, None), nn.Module)), None)


def find_mlp_branch(layer: nn.Module) -> MLPBranch:
    """The MLP branch of a decoder layer, by the names transformers gives its modules; ValueError if not found.

    The name ``post_attention_layernorm`` means two things: the MLP's input norm in a pre-norm layer (Llama), and the
    attention output's norm in a layer that also norms the MLP's output (Gemma-2, OLMo-2). So a layer with a post-MLP
    norm takes its MLP's input norm from ``pre_feedforward_layernorm`` (Gemma), or ``post_attention_layernorm`` when the
    attention branch has a norm of its own (GLM-4's ``post_self_attn_layernorm``), or none (OLMo-2, EXAONE-4).
    """
    kind = type(layer).__name__
    if getattr(layer, "use_parallel_residual", False) or getattr(layer, "parallel_attn", False):
        raise ValueError(
            f"skip_mode='mlp' needs the MLP to read the residual stream after attention, but {kind} runs attention "
            "and the MLP in parallel on the layer's input (`use_parallel_residual`), so the cosine labels would "
            "compare the wrong states. Use skip_mode='block'."
        )
    mlp = _module_named(layer, MLP_NAMES)
    post_norm = _module_named(layer, POST_MLP_NORM_NAMES)
    if post_norm is None:
        pre_norm = _module_named(layer, PRE_MLP_NORM_NAMES)
    elif isinstance(getattr(layer, "pre_feedforward_layernorm", None), nn.Module):
        pre_norm = "pre_feedforward_layernorm"
    elif isinstance(getattr(layer, "post_self_attn_layernorm", None), nn.Module):
        pre_norm = _module_named(layer, ("post_attention_layernorm",))
    else:
        pre_norm = None  # the MLP reads the residual stream itself
    if mlp is None or (pre_norm is None and post_norm is None):
        raise ValueError(
            f"skip_mode='mlp' needs a decoder layer with an MLP ({'/'.join(MLP_NAMES)}) behind a pre-MLP norm "
            f"({'/'.join(PRE_MLP_NORM_NAMES)}) or followed by a post-MLP norm ({'/'.join(POST_MLP_NORM_NAMES)}); "
            f"{kind} has neither. Use skip_mode='block'."
        )
    return MLPBranch(mlp=mlp, pre_norm=pre_norm, post_norm=post_norm)


def find_branch_output(layer: nn.Module) -> tuple[str, bool] | None:
    """``(name, is_post_norm)`` of the module whose output is the layer's MLP branch as it joins the residual stream:
    the post-MLP norm where there is one, else the MLP itself (also in a parallel-residual layer); None without an
    MLP. ``skip_mode='block'`` scales that output, as the official code scales the MLP's."""
    post_norm = _module_named(layer, POST_MLP_NORM_NAMES)
    if post_norm is not None:
        return post_norm, True
    mlp = _module_named(layer, MLP_NAMES)
    return None if mlp is None else (mlp, False)


def gate_branch_output(plan: RoutingPlan, out: torch.Tensor) -> torch.Tensor:
    """The MLP branch's output as DLO adds it to the residual: times ŝ, and zero for the tokens the router skipped
    (in training, where every token ran; in eval the skipped tokens' output is zero already). Records the cosine
    labels ``cos(h', h' + branch)`` when the plan wants them."""
    shape = out.shape
    if plan.training and plan.want_cos and plan.residual is not None:
        with torch.no_grad():
            residual = plan.residual.reshape(-1, shape[-1]).float()
            branch = out.reshape(residual.shape).float() * plan.residual_multiplier
            plan.cos = F.cosine_similarity(residual, residual + branch, dim=-1)
    gate = plan.scale.to(out.dtype)
    if plan.training:
        gate = gate * plan.selected.to(out.dtype)
    return out * gate.view(*shape[:-1], 1)


_EXTRA_OUTPUTS_MESSAGE = (
    "DLO skip_mode='mlp' cannot skip {kind}: it returns extra outputs besides its hidden states (a mixture of experts' "
    "router scores), which would cover only the tokens that run. Use skip_mode='block'."
)


class SkipMLP(Delegating):
    """Runs the wrapped MLP on the plan's selected tokens only (eval) or on all and masks (training).

    The plan is the current forward's, read through the block that owns this shadow (``DLOBlock.current_plan``).
    ``gates_output``: the MLP's output is the branch's (no post-MLP norm), so the mask and scale apply here; otherwise
    ``BranchOutputGate`` applies them after the norm. ``taps_residual``: the MLP reads ``h'`` itself (no pre-MLP
    norm), so its input is the residual for the labels.
    """

    def __init__(
        self, mlp: nn.Module, block: DLOBlock, *, gates_output: bool, taps_residual: bool, runs_whole: bool = False
    ) -> None:
        super().__init__()
        self.inner = mlp
        self._block = (block,)  # a plain tuple, not a child: the block wraps the layer this shadow sits in
        self._gates_output = gates_output
        self._taps_residual = taps_residual
        # skip_mode='block': the MLP always runs on every token of the call (the chosen ones, packed), and only its
        # output is scaled; an MLP that also returns extras (a mixture of experts' router scores) keeps them
        self._runs_whole = runs_whole

    @property
    def plan(self) -> RoutingPlan | None:
        return self._block[0].current_plan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None:
            return self.inner(x)
        if self._taps_residual and plan.want_cos:
            plan.residual = x.detach()
        # A forward that records what modules inside the MLP output (a mixture of experts' router logits, for its
        # load-balancing loss) needs them for every token: the MLP then runs on all of them, and the skipped ones'
        # branch is zeroed after, as in training (the compute saving is given up for that forward).
        if plan.training or plan.index is None or records_outputs_inside_layers():
            out = self.inner(x)
            if isinstance(out, tuple):
                if not self._runs_whole:
                    raise ValueError(_EXTRA_OUTPUTS_MESSAGE.format(kind=type(self.inner).__name__))
                return (gate_branch_output(plan, out[0]) if self._gates_output else out[0], *out[1:])
            if not self._gates_output:
                return out  # the post-MLP norm's shadow masks and scales
            if not plan.training and plan.index is not None:
                return out * (plan.scale * plan.selected).to(out.dtype).view(*out.shape[:-1], 1)
            return gate_branch_output(plan, out)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        result = flat.new_zeros(flat.shape)
        # Only the selected tokens go through the MLP: this is where inference saves compute. Base-path tokens (a
        # non-finite router score) run in a call of their own, so the chosen tokens' call is the same, bit for bit,
        # as in a batch without them.
        for index in (plan.index, plan.base_index):
            if index.numel():
                chosen = self.inner(flat.index_select(0, index).unsqueeze(0))
                if isinstance(chosen, tuple):
                    raise ValueError(_EXTRA_OUTPUTS_MESSAGE.format(kind=type(self.inner).__name__))
                chosen = chosen.squeeze(0)
                if self._gates_output:
                    chosen = chosen * plan.scale.index_select(0, index).to(chosen.dtype).unsqueeze(-1)
                result = result.index_copy(0, index, chosen.to(result.dtype))
        return result.view(shape)


class BranchOutputGate(Delegating):
    """The post-MLP norm, followed by DLO's mask and scale (``gate_branch_output``). The norm of a skipped token's
    zero MLP output is zero (an RMSNorm or a LayerNorm without bias), and the gate keeps it exactly zero."""

    def __init__(self, norm: nn.Module, block: DLOBlock) -> None:
        super().__init__()
        self.inner = norm
        self._block = (block,)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(x, *args, **kwargs)
        plan = self._block[0].current_plan()
        if plan is None:
            return out
        if not plan.training and plan.index is not None:
            # eval with a selection: skipped tokens' MLP output was zero; zero their branch whatever the norm does
            return out * (plan.scale * plan.selected).to(out.dtype).view(*out.shape[:-1], 1)
        return gate_branch_output(plan, out)


class ResidualTap(Delegating):
    """The pre-MLP norm, recording its input (the residual stream ``h'``) into the plan when labels are wanted."""

    def __init__(self, norm: nn.Module, block: DLOBlock) -> None:
        super().__init__()
        self.inner = norm
        self._block = (block,)

    @property
    def plan(self) -> RoutingPlan | None:
        return self._block[0].current_plan()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.plan
        if plan is not None and plan.want_cos:
            plan.residual = x.detach()
        return self.inner(x, *args, **kwargs)
