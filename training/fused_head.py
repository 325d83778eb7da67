"""The fused head in the job: both output layers applied inside the loss, so no logits outlive a chunk.

``loss.fused`` takes final hidden rows and output layers and never builds ``[tokens, V_local]``
logits. Here the engines are made to hand it those: after ``deepspeed.initialize`` each engine's
output layer gets an instance-level ``forward`` (:class:`FusedHeads`). Outside a request the layer's
own forward runs (export, generation, the unfused step). Inside one (:meth:`FusedHeads.request`,
one per micro-batch):

- the teacher's layer keeps its input's valid rows (detached) and returns an empty ``[B, k, 0]`` slice;
- the student's layer selects its input's valid rows (a differentiable ``index_select``), calls the
  request's ``compute`` with them, both :class:`loss.fused.OutputLayer` s and the teacher's rows,
  and returns what ``compute`` returns: the 0-dim summed objective.

So the objective runs *inside the student's head module call*: ZeRO-3's pre-forward hook has
gathered the head's weight, the weight's gradient reaches its own ZeRO reduce hooks, and the
engine's output (``.logits``) is the total, so the engine's output backward hooks and backward
prologue fire as they do for the unfused loss (DeepSpeed 0.19.8: ``engine.forward``'s
``register_output_backward_hooks``, ``parameter_offload``'s module hooks). A ``zero3`` teacher's
head weight is gathered around the call (frozen: nothing to reduce); a resident teacher's
tensor-parallel slice is used as it is. Gemma-2's final soft-cap, which transformers applies to
whatever the head returns, is switched off for the request and passed to the loss instead
(:func:`training.models.without_final_softcap`).
"""

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from core.errors import ConfigError
from loss.fused import OutputLayer
from training.models import family, fused_head_problem, without_final_softcap

Compute = Callable[[torch.Tensor, OutputLayer, Optional[torch.Tensor], Optional[OutputLayer]], tuple]
"""``compute(student_rows [n, H], student_layer, teacher_rows [n, H_t] | None, teacher_layer | None)
-> (total, out)``: run inside the student's head call; ``total`` (a 0-dim tensor) is what the head
returns, ``out`` is kept on the request."""


@dataclass
class Request:
    """One micro-batch's call of both models through their fused heads."""

    select: Optional[torch.Tensor]
    """``[n]`` rows of the heads' flattened ``[B·k]`` input that have a target; None: all of them."""
    compute: Compute
    teacher_rows: Optional[torch.Tensor] = None
    """``[n, H_t]``: what the teacher's head was given at the valid rows (detached)."""
    total: Optional[torch.Tensor] = None
    """What the student's head returned: ``compute``'s total."""
    out: dict = field(default_factory=dict)
    """``compute``'s per-token outputs."""


def _rows(hidden: torch.Tensor, select: Optional[torch.Tensor]) -> torch.Tensor:
    """``[n, H]`` from the head's ``[B, k, H]`` input: a view when every row is valid, else the
    selected rows (differentiable: the gradient scatters back)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat if select is None else flat.index_select(0, select)


def _empty_slice(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_zeros(*hidden.shape[:-1], 0)  # (B, k, 0): no logits


class FusedHeads:
    """The student's (and the teacher's) output layer, answering through ``loss.fused`` inside a
    :meth:`request`. Built by :func:`install` once the engines exist."""

    def __init__(self, student, teacher):
        self._student = student.module
        self._teacher = None if teacher is None else teacher.module
        self._request: Optional[Request] = None
        self._student_softcap = _softcap(self._student)
        self._teacher_softcap = None if teacher is None else _softcap(self._teacher)
        _replace_forward(self._student.get_output_embeddings(), self._student_forward)
        if self._teacher is not None:
            _replace_forward(self._teacher.get_output_embeddings(), self._teacher_forward)

    @contextlib.contextmanager
    def request(self, select: Optional[torch.Tensor], compute: Compute):
        """Inside, the models' calls go through the fused heads (one teacher call, then one student
        call); yields the :class:`Request` that collects the results. Not re-entrant."""
        if self._request is not None:
            raise RuntimeError("FusedHeads.request: a request is already open")
        request = Request(select=select, compute=compute)
        self._request = request
        try:
            with without_final_softcap(self._student), (
                    without_final_softcap(self._teacher) if self._teacher is not None else contextlib.nullcontext()):
                yield request
        finally:
            self._request = None

    def served(self, logits: torch.Tensor, request: Request) -> torch.Tensor:
        """``logits`` (the engine output's ``.logits``), checked to be ``request``'s total: the same
        tensor, or it behind DeepSpeed's own identity functions only (ZeRO-3 wraps every module's
        output in its backward-hook function). Anything else (a model that post-processed its
        head's output) is refused loudly rather than back-propagated."""
        if request.total is None:
            raise RuntimeError("fused head: the student's output layer was not called inside the request")
        node, target = logits.grad_fn, request.total.grad_fn
        while logits is not request.total and node is not target:
            origin = getattr(node, "_forward_cls", None)
            inputs = [] if node is None else [next_node for next_node, _ in node.next_functions if next_node]
            if origin is None or not origin.__module__.startswith("deepspeed.") or len(inputs) != 1:
                raise RuntimeError(f"fused head: the model's output is not its head's total (it went through "
                                   f"{type(node).__name__}); set loss.fused_head: false")
            node = inputs[0]
        return logits

    def _student_forward(self, original, head, hidden):
        request = self._request
        if request is None:
            return original(hidden)
        teacher_head = None if self._teacher is None else self._teacher.get_output_embeddings()
        import deepspeed

        # A zero3 teacher's slice is partitioned outside its own forward; frozen, so reading it is all.
        # A no-op for parameters ZeRO does not partition (a resident teacher's, stages 0-2).
        with deepspeed.zero.GatheredParameters([] if teacher_head is None else [teacher_head.weight]):
            teacher = None if teacher_head is None else OutputLayer(
                weight=teacher_head.weight.detach(), bias=teacher_head.bias, softcap=self._teacher_softcap)
            student = OutputLayer(weight=head.weight, bias=head.bias, softcap=self._student_softcap)
            request.total, request.out = request.compute(_rows(hidden, request.select), student,
                                                         request.teacher_rows, teacher)
        return request.total

    def _teacher_forward(self, original, head, hidden):
        request = self._request
        if request is None:
            return original(hidden)
        request.teacher_rows = _rows(hidden, request.select).detach()
        return _empty_slice(hidden)


def _softcap(model) -> Optional[float]:
    return family(model.config).final_logit_softcap(model.config)


def _replace_forward(head, forward) -> None:
    """``head(x)`` now calls ``forward(original, head, x)``: an instance attribute, so the module's
    hooks (``nn.Module.__call__``) still run around it."""
    original = head.forward
    head.forward = lambda hidden: forward(original, head, hidden)


def _engine_problem(engine) -> Optional[str]:
    """Why ``engine`` would not call its module's output layer as a module (DeepCompile, a compiled
    module), or None."""
    if engine.is_deepcompile_enabled():
        return "DeepSpeed's DeepCompile (compile.deepcompile) replaces the module calls the fused head runs in"
    if getattr(engine, "is_compiled", False):
        return "the engine is compiled (engine.compile), which traces past the fused head's module call"
    return None


def problem(student, teacher) -> Optional[str]:
    """Why the fused head cannot run on these engines (the first reason found), or None."""
    for role, engine in (("student", student), ("teacher", teacher)):
        if engine is None:
            continue
        reason = _engine_problem(engine) or fused_head_problem(engine.module)
        if reason:
            return f"{role}: {reason}"
    return None


def install(student, teacher, setting) -> Optional[FusedHeads]:
    """``loss.fused_head`` (``setting``: ``"auto"``, True or False) applied to the built engines: the
    installed :class:`FusedHeads`, or None for the unfused path. ``True`` where :func:`problem` finds
    a reason is refused by name; ``auto`` then takes the unfused path. Says which, once (rank 0)."""
    reason = "loss.fused_head: false" if setting is False else problem(student, teacher)
    if reason and setting is True:
        raise ConfigError(f"loss.fused_head: true, but the fused head cannot run here ({reason}); "
                          f"set loss.fused_head: auto or false")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"fused head: off ({reason})" if reason else "fused head: on (output layers applied inside the loss, "
              "in token chunks)", file=sys.stderr)
    return None if reason else FusedHeads(student, teacher)
