"""Per-layer statistics of a causal LM over a text sample: redundancy, update size and the logit lens.

For every block ``l`` of the model's stack, with ``x`` the residual stream entering it and ``y`` the one leaving it,
over the real (non-padding) tokens:

- ``cosine``: mean of ``cos(x, y)`` per token. Near 1 means the block barely turns the representation (redundant).
- ``relative_update``: mean of ``||y - x|| / ||x||`` per token, the size of the block's update.
- ``redundant_fraction``: fraction of tokens with ``cos(x, y) >= redundancy_threshold``, the share a router could
  skip at little cost.
- ``lens_loss`` / ``lens_accuracy``: next-token cross-entropy and top-1 accuracy of ``head(final_norm(y))`` (the
  logit lens), at positions whose next token is real. For the last block this is the model's own prediction.
- ``lens_agreement``: how often the layer's top-1 token equals the final layer's.

The embedding output (the input of block 0) gets the same lens numbers under ``embedding``. Blocks are read through
forward hooks on the block stack found by ``core.layer_stack``, so any decoder stack that transformers can load works.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layer_stack import LayerStack, find_final_norm, find_layer_stack
from ..core.output_head import final_logit_multiplier, final_logit_softcap
from .errors import AnalysisError

__all__ = ["LayerAnalysis", "LayerStatsCollector", "analyze_layers", "lens_positions"]

_LENS_CHUNK = 256  # positions per LM-head projection: peak extra memory is chunk x vocabulary floats


@dataclass
class LayerAnalysis:
    """Per-layer statistics (lists indexed by block) and the counts they are averaged over."""

    num_layers: int
    num_sequences: int = 0
    num_tokens: int = 0
    num_lens_positions: int = 0
    redundancy_threshold: float = 0.98
    cosine: list[float] = field(default_factory=list)
    relative_update: list[float] = field(default_factory=list)
    redundant_fraction: list[float] = field(default_factory=list)
    lens_loss: list[float] = field(default_factory=list)
    lens_accuracy: list[float] = field(default_factory=list)
    lens_agreement: list[float] = field(default_factory=list)
    embedding: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lens_positions(
    attention_mask: torch.Tensor, max_per_sequence: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean ``[batch, seq]`` mask of the positions the logit lens scores.

    A position qualifies when it and the next one are real tokens (the next token is the target). With
    ``max_per_sequence``, at most that many qualifying positions per sequence are kept, drawn uniformly at random.
    """
    real = attention_mask.bool()
    valid = torch.zeros_like(real)
    valid[:, :-1] = real[:, :-1] & real[:, 1:]
    if max_per_sequence is None or max_per_sequence >= valid.shape[1]:
        return valid
    scores = torch.rand(valid.shape, generator=generator)
    scores = scores.masked_fill(~valid, -1.0)
    top = scores.topk(max_per_sequence, dim=1).indices
    keep = torch.zeros_like(valid)
    keep.scatter_(1, top, True)
    return keep & valid


class LayerStatsCollector:
    """Hooks on a model's blocks that accumulate the statistics of ``LayerAnalysis`` over batches.

    Use ``run(batch_input_ids, attention_mask, lens_mask)`` per batch, then ``result()``; call ``close()`` (or use it
    as a context manager) to remove the hooks.
    """

    def __init__(self, model: nn.Module, redundancy_threshold: float = 0.98) -> None:
        stack = find_layer_stack(model)
        if stack is None:
            raise AnalysisError(f"{type(model).__name__} has no stack of transformer blocks to analyse.")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise AnalysisError(
                f"{type(model).__name__} has no language-model head; the logit lens needs a causal LM "
                "(loaded with AutoModelForCausalLM)."
            )
        norm = find_final_norm(model, stack)
        self.model = model
        self.stack: LayerStack = stack
        self.head = head
        self.final_norm = norm[0] if norm is not None else nn.Identity()
        # a projection between the final state and the head (OPT's `project_out` when word_embed_proj_dim differs)
        parent_path = stack.path.rpartition(".")[0]
        owner = model.get_submodule(parent_path) if parent_path else model
        projection = getattr(owner, "project_out", None)
        self.projection = projection if isinstance(projection, nn.Module) else nn.Identity()
        try:
            self._multiplier = final_logit_multiplier(model)
        except ValueError as error:
            raise AnalysisError(f"The logit lens cannot match this model's own logits: {error}") from None
        self._softcap = final_logit_softcap(model)
        self.redundancy_threshold = float(redundancy_threshold)
        num_layers = stack.num_layers
        # float64 sums: thousands of batches of float32 per-token values
        self._cos = torch.zeros(num_layers, dtype=torch.float64)
        self._update = torch.zeros(num_layers, dtype=torch.float64)
        self._redundant = torch.zeros(num_layers, dtype=torch.float64)
        self._loss = torch.zeros(num_layers + 1, dtype=torch.float64)  # row 0: embedding
        self._correct = torch.zeros(num_layers + 1, dtype=torch.float64)
        self._agree = torch.zeros(num_layers + 1, dtype=torch.float64)
        self._tokens = 0
        self._lens_positions = 0
        self._sequences = 0
        # state of the current batch, set by run()
        self._mask: torch.Tensor | None = None
        self._lens_mask: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._top1: dict[int, torch.Tensor] = {}
        self._handles = []
        for index, block in enumerate(stack.layers):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post_hook(index), with_kwargs=True))
        forward_params = inspect.signature(model.forward).parameters
        # The lens projects the last block itself, so the model's own full-vocabulary logits would be wasted work.
        self._forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._mask is None:
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            self._inputs[index] = hidden

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._mask is None:
                return
            hidden_out = output[0] if isinstance(output, (tuple, list)) else output
            hidden_in = self._inputs.pop(index)
            if index == 0:
                self._lens(0, hidden_in)
            self._block_stats(index, hidden_in, hidden_out)
            self._lens(index + 1, hidden_out)

        return hook

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def _block_stats(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        mask = self._mask
        x = hidden_in[mask].float()
        y = hidden_out[mask].float()
        cos = F.cosine_similarity(x, y, dim=-1, eps=1e-12)
        update = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)
        self._cos[index] += cos.double().sum().cpu()
        self._update[index] += update.double().sum().cpu()
        self._redundant[index] += (cos >= self.redundancy_threshold).double().sum().cpu()

    def lens_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logit lens: the model's final norm and LM head (with its logit scaling) applied to ``hidden``."""
        logits = self.head(self.projection(self.final_norm(hidden))).float()
        if self._multiplier != 1.0:
            logits = logits * self._multiplier
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @torch.no_grad()
    def _lens(self, row: int, hidden: torch.Tensor) -> None:
        selected = hidden[self._lens_mask]
        targets = self._targets
        loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        top1 = torch.empty(selected.shape[0], dtype=torch.long, device=selected.device)
        for start in range(0, selected.shape[0], _LENS_CHUNK):
            logits = self.lens_logits(selected[start : start + _LENS_CHUNK])
            target = targets[start : start + _LENS_CHUNK]
            loss += F.cross_entropy(logits, target, reduction="sum").double().cpu()
            predicted = logits.argmax(dim=-1)
            correct += (predicted == target).double().sum().cpu()
            top1[start : start + _LENS_CHUNK] = predicted
        self._loss[row] += loss
        self._correct[row] += correct
        self._top1[row] = top1

    # ------------------------------------------------------------------ driving

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lens_mask: torch.Tensor) -> None:
        """One forward over a batch; ``lens_mask`` marks the positions scored by the logit lens (see
        ``lens_positions``)."""
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        lens_mask = lens_mask.to(device).bool()
        next_tokens = torch.roll(input_ids, shifts=-1, dims=1)
        self._mask = attention_mask.bool()
        self._lens_mask = lens_mask
        self._targets = next_tokens[lens_mask]
        self._inputs, self._top1 = {}, {}
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **self._forward_kwargs)
            final = self._top1[self.stack.num_layers]
            for row, top1 in self._top1.items():
                self._agree[row] += (top1 == final).double().sum().cpu()
        finally:
            self._mask = self._lens_mask = self._targets = None
            self._inputs, self._top1 = {}, {}
        self._tokens += int(attention_mask.sum())
        self._lens_positions += int(lens_mask.sum())
        self._sequences += input_ids.shape[0]

    def result(self) -> LayerAnalysis:
        tokens = max(self._tokens, 1)
        positions = max(self._lens_positions, 1)

        def per_token(values: torch.Tensor, count: int) -> list[float]:
            return [float(v) / count for v in values]

        loss = per_token(self._loss, positions)
        accuracy = per_token(self._correct, positions)
        agreement = per_token(self._agree, positions)
        if self._lens_positions == 0:
            loss = accuracy = agreement = [math.nan] * len(loss)
        return LayerAnalysis(
            num_layers=self.stack.num_layers,
            num_sequences=self._sequences,
            num_tokens=self._tokens,
            num_lens_positions=self._lens_positions,
            redundancy_threshold=self.redundancy_threshold,
            cosine=per_token(self._cos, tokens),
            relative_update=per_token(self._update, tokens),
            redundant_fraction=per_token(self._redundant, tokens),
            lens_loss=loss[1:],
            lens_accuracy=accuracy[1:],
            lens_agreement=agreement[1:],
            embedding={"lens_loss": loss[0], "lens_accuracy": accuracy[0], "lens_agreement": agreement[0]},
        )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerStatsCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def analyze_layers(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    lens_positions_per_sequence: int | None = None,
    redundancy_threshold: float = 0.98,
    seed: int = 0,
    progress: Any = None,
) -> LayerAnalysis:
    """Run ``model`` (in eval mode) over ``batches`` (objects with ``input_ids`` and ``attention_mask``) and return
    the per-layer statistics. ``progress`` is an optional tqdm-like bar advanced once per batch."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    try:
        with LayerStatsCollector(model, redundancy_threshold=redundancy_threshold) as collector:
            for batch in batches:
                lens_mask = lens_positions(batch.attention_mask, lens_positions_per_sequence, generator)
                collector.run(batch.input_ids, batch.attention_mask, lens_mask)
                if progress is not None:
                    progress.update(1)
            return collector.result()
    finally:
        model.train(was_training)
