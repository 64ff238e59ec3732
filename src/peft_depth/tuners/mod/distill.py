"""MoD's distillation loss through the frozen LM head, in chunks of positions, with its gradient computed on the fly.

For each earlier late layer l and each selected position, ``KL(softmax(z_L / T) ‖ softmax(z_l / T))`` with
``z = W · state + b`` (optionally soft-capped) and the teacher state detached. A plain autograd implementation keeps
every layer's ``[positions, vocab]`` log-probabilities for backward, so memory grows K× with the vocabulary. Here the
forward walks over chunks of positions and, while the chunk's logits are at hand, also computes the gradient with
respect to the student states (``(q − p) / T`` pulled back through W): only that ``[layers, positions, hidden]``
gradient is kept. Peak extra memory is a few ``[layers × chunk, vocab]`` tensors, and backward costs no second
projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunked_distillation_kl"]


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        students: torch.Tensor,
        teacher: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        temperature: float,
        multiplier: float,
        softcap: float | None,
        chunk_size: int,
        need_grad: bool,
    ) -> torch.Tensor:
        num_layers, num_positions, hidden = students.shape
        kl_sums = torch.zeros(num_layers, dtype=torch.float32, device=students.device)
        grad = torch.empty_like(students) if need_grad else None
        head_dtype = weight.dtype
        for start in range(0, num_positions, chunk_size):
            stop = min(start + chunk_size, num_positions)
            size = stop - start
            teacher_logits = F.linear(teacher[start:stop].to(head_dtype), weight, bias).float()
            if multiplier != 1.0:
                teacher_logits.mul_(multiplier)
            if softcap is not None:
                teacher_logits = softcap * torch.tanh(teacher_logits / softcap)
            teacher_logits.div_(temperature)
            teacher_lse = torch.logsumexp(teacher_logits, dim=-1, keepdim=True)  # [C, 1]
            p = torch.exp(teacher_logits - teacher_lse)
            chunk = students[:, start:stop].reshape(num_layers * size, hidden).to(head_dtype)
            logits = F.linear(chunk, weight, bias).float().view(num_layers, size, -1)
            if multiplier != 1.0:
                logits.mul_(multiplier)
            tanh = None
            if softcap is not None:
                tanh = torch.tanh(logits / softcap)
                logits = softcap * tanh
            logits.div_(temperature)
            student_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [L, C, 1]
            # log q - log p = (z_s - z_t)/T - (lse_s - lse_t), formed from the small differences first and in place:
            # float32 log-probabilities subtracted directly would lose ~1e-4 of a small KL to rounding.
            log_ratio = logits.sub_(teacher_logits).sub_(student_lse - teacher_lse)
            del teacher_logits
            kl_sums -= (log_ratio * p).sum(dim=(-1, -2))
            if grad is not None:
                # d KL / d z_l = (q - p) / T = p (exp(log q - log p) - 1) / T; through the cap × (1 - tanh²), and
                # through the family's scaling × its multiplier.
                dz = log_ratio.expm1_().mul_(p).div_(temperature)
                if tanh is not None:
                    dz.mul_(1 - tanh * tanh)
                if multiplier != 1.0:
                    dz.mul_(multiplier)
                grad[:, start:stop] = (dz.view(num_layers * size, -1).to(head_dtype) @ weight).view(
                    num_layers, size, hidden
                )
            del log_ratio, p
        ctx.num_positions = num_positions
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.has_grad = grad is not None
        return kl_sums / max(num_positions, 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.has_grad:
            raise RuntimeError("MoD distillation: backward through a forward that was run without gradient.")
        (grad,) = ctx.saved_tensors
        scale = (grad_output.float() / max(ctx.num_positions, 1)).to(grad.dtype).view(-1, 1, 1)
        return grad * scale, None, None, None, None, None, None, None, None


def chunked_distillation_kl(
    students: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    multiplier: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(head(teacher)/T) ‖ softmax(head(students[l])/T))`` for each layer l.

    Args:
        students: ``[L, P, hidden]`` normalised states of the earlier late layers at the selected positions.
        teacher: ``[P, hidden]`` normalised final state at the same positions (treated as constant).
        weight, bias: the frozen LM head (``[vocab, hidden]``, ``[vocab]`` or None); they get no gradient.
        temperature: T of both softmaxes.
        multiplier: the family's scaling of the head's output (Cohere's ``logit_scale``, Granite's ``1/logits_scaling``),
            applied to both logits before any cap.
        softcap: final-logit soft-capping ``c · tanh(z / c)`` applied to both logits (Gemma 2/3), or None.
        chunk_size: positions per chunk.

    Returns:
        ``[L]`` float32 mean KL per layer; differentiable with respect to ``students`` only.
    """
    need_grad = torch.is_grad_enabled() and students.requires_grad
    return _ChunkedDistillation.apply(
        students,
        teacher.detach(),
        weight.detach(),
        None if bias is None else bias.detach(),
        float(temperature),
        float(multiplier),
        None if softcap is None else float(softcap),
        int(chunk_size),
        need_grad,
    )
