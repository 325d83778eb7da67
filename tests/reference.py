"""Float64 full-vocabulary references, written from the definitions (DESIGN.md §1), for tests.

Deliberately naive: masked log-softmaxes over the whole vocabulary, autograd for gradients. Only
the tie rule (value descending, then id ascending) is shared with the code under test, as the
specification.
"""

import torch


def _masked_log_softmax(x, keep):
    """log-softmax over the entries in ``keep``; -inf elsewhere and on rows with no mass at all.
    Rows without mass are computed on zeros so that no NaN reaches autograd."""
    has_mass = keep & (x > float("-inf"))
    row_has_mass = has_mass.any(dim=-1, keepdim=True)
    safe = torch.where(row_has_mass, torch.where(keep, x, torch.full_like(x, float("-inf"))), torch.zeros_like(x))
    log_probs = safe - torch.logsumexp(safe, dim=-1, keepdim=True)
    return torch.where(has_mass, log_probs, torch.full_like(x, float("-inf")))


def _plogp_ratio(log_p, log_q):
    """Elementwise p·(log p − log q), 0 where p = 0 (with NaN-free gradients there)."""
    p = log_p.exp()
    positive = p > 0
    zero = torch.zeros_like(p)
    return torch.where(positive, p * (torch.where(positive, log_p, zero) - torch.where(positive, log_q, zero)), zero)


def top_k_mask(teacher, k):
    """Bool mask of the K largest teacher logits per row (ties → lower id), any leading shape."""
    k = min(k, teacher.shape[-1])
    order = torch.sort(teacher, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, order, True)


def reference_parts(student, teacher, top_k, temperature=1.0):
    """(head_kl, tail_kl, P_tail, Q_tail) in float64; differentiable in ``student``."""
    s, t = student.double() / temperature, teacher.double() / temperature
    everything = torch.ones_like(t, dtype=torch.bool)
    log_p, log_q = _masked_log_softmax(t, everything), _masked_log_softmax(s, everything)
    top = top_k_mask(t, top_k)
    tail = ~top
    p_tail = torch.where(tail, log_p.exp(), 0.0).sum(-1)
    q_tail = torch.where(tail, log_q.exp(), 0.0).sum(-1)
    bucket = torch.where(p_tail > 0, p_tail * (p_tail.log() - q_tail.log()), torch.zeros_like(p_tail))
    head_kl = torch.where(top, _plogp_ratio(log_p, log_q), 0.0).sum(-1) + bucket
    log_p_tilde, log_q_tilde = _masked_log_softmax(t, tail), _masked_log_softmax(s, tail)
    tail_kl = torch.where(tail, _plogp_ratio(log_p_tilde, log_q_tilde), 0.0).sum(-1)
    tail_kl = torch.where(p_tail > 0, tail_kl, torch.zeros_like(tail_kl))
    return head_kl, tail_kl, p_tail, q_tail


def reference_divergence(student, teacher, top_k, beta, temperature=1.0):
    head_kl, tail_kl, _, _ = reference_parts(student, teacher, top_k, temperature)
    if isinstance(beta, torch.Tensor):
        beta = beta.double()
    return head_kl + beta * tail_kl


def reference_kl(student, teacher, temperature=1.0):
    """KL(p‖q) in float64 from the textbook sum."""
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    return _plogp_ratio(log_p, log_q).sum(-1)
