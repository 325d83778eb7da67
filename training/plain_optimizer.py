"""The student's optimizer at ZeRO stage 0 (DeepSpeed's plain data parallelism).

ZeRO's optimizers clip the gradients to ``gradient_clipping``, report the global norm and skip a
step whose norm is not finite. At stage 0 in fp32 DeepSpeed steps the plain torch optimizer, which
does none of that: its clip discards the norm (``get_global_grad_norm`` stays None) and a NaN
gradient would be applied. :class:`GuardedAdamW` does the three, and tells the engine through
DeepSpeed's own optimizer protocol: ``_global_grad_norm`` and ``overflow``, which the engine reads
after ``step()`` (an overflowed step is counted as skipped and the scheduler does not advance, as
under ZeRO).

Stage 0 runs at tensor-parallel size 1 only (``training.deepspeed_config.stage_problem``): every
rank holds every gradient, all-reduced over the data-parallel ranks before ``step()``, so the
local norm is the global one.
"""

import copy
from functools import partial
from typing import Callable, Tuple

import torch


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips to ``max_norm`` (0: no clipping), keeps the pre-clip gradient norm in
    ``_global_grad_norm`` (0-dim fp32, on the gradients' device) and sets ``overflow`` instead of
    stepping when that norm is not finite."""

    def __init__(self, params, *, max_norm: float, **adamw):
        super().__init__(params, **adamw)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # 0-dim fp32
        self._global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))  # host sync: ZeRO's optimizers take the same one
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        return super().step(closure)


def plain_data_parallel(student_config: dict) -> Tuple[dict, Callable]:
    """Split a completed stage-0 student config (optimizer ``AdamW``) into the DeepSpeed config
    without its optimizer and with clipping off, and the callable ``deepspeed.initialize(optimizer=...)``
    builds :class:`GuardedAdamW` from, with the same parameters and ``max_norm`` the clipping."""
    config = copy.deepcopy(student_config)
    optimizer = config.pop("optimizer")
    max_norm = config.get("gradient_clipping", 0.0)
    config["gradient_clipping"] = 0.0  # DeepSpeed must not clip first (its default is 1.0): the norm is pre-clip
    if optimizer.get("type") != "AdamW":
        raise ValueError(f"ZeRO stage 0: the student's optimizer must be AdamW, got {optimizer.get('type')!r}")
    params = {key: value for key, value in optimizer.get("params", {}).items() if key not in ("torch_adam",
                                                                                            "adam_w_mode")}
    return config, partial(GuardedAdamW, max_norm=max_norm, **params)
