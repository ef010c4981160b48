"""Knowledge distillation's per-token loss, on vocabulary-parallel logits.

Per token: α · T² · KL(p_teacher ‖ p_student) + (1 − α) · CE(student, label), where p = softmax
(logits / T) over the whole vocabulary (Hinton et al. 2015; the T² keeps the soft term's gradient
scale independent of T). The logits are split over the tensor-parallel ranks by vocabulary
(``[b, s, V/t]``): the log-softmax takes its maximum and its sum of exponentials over the TP
group, and the KL sum over the vocabulary is summed over the group too. The sums are
all-reduced forward and passed through unchanged backward (every TP rank computes the same loss;
each gets the gradient of its own slice), so TP=2 gives TP=1's loss and gradients. The result is
per token, and is weighted like the plain loss (``model/loss.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: a value every rank of ``group`` uses."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _SumOverGroup.apply(x, group)


def _peak(logits: torch.Tensor, group) -> torch.Tensor:
    peak = logits.detach().amax(dim=-1, keepdim=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return peak


def vocab_parallel_log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the last dimension, split over ``group`` (None: not split); for values
    that need no gradient (its backward is right on one rank only)."""
    shifted = logits - _peak(logits, group)
    total = _sum_over(shifted.exp().sum(dim=-1, keepdim=True), group)
    return shifted - total.log()


def vocab_parallel_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      group) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) per row, the vocabulary split over ``group``.

    Written as sum_v p_t (log p_t - z_v) + log sum_v exp(z_v) (z the shifted student logits, the
    teacher's probabilities summing to 1), so each term appears once in the replicated loss: its
    gradient on this rank's slice is softmax(z) - p_t there, as for the whole vocabulary."""
    with torch.no_grad():
        teacher = vocab_parallel_log_softmax(teacher_logits, group)
    shifted = student_logits - _peak(student_logits, group)
    log_total = _sum_over(shifted.exp().sum(dim=-1), group).log()
    return _sum_over((teacher.exp() * (teacher - shifted)).sum(dim=-1), group) + log_total


def distill_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       cross_entropy: torch.Tensor, *, alpha: float, temperature: float,
                       group) -> torch.Tensor:
    """Per-token ``[b, s]`` loss from ``[b, s, V/t]`` logits and the student's per-token CE."""
    kl = vocab_parallel_kl(teacher_logits.float() / temperature,
                           student_logits.float() / temperature, group)
    return alpha * temperature**2 * kl + (1.0 - alpha) * cross_entropy
