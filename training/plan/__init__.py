"""Plan a distillation job's layout before it runs: memory per GPU by term, collective bytes per
step by kind, and a step-time estimate, for every layout of the two models on a cluster.

Every figure is an **estimate** from the models' shapes (built on the ``meta`` device from their
configs: no weights, no hub) and the cluster's nominal figures; :data:`ASSUMPTIONS` lists what the
model of the job assumes. ``launch.plan`` prints it; the job prints the plan of its own layout at
start and logs ``planned_peak_memory_gb`` beside its measured ``peak_memory_gb``.

Units: bytes; GB = 10⁹ bytes. Traffic is the bytes each GPU hands *into* collectives per optimizer
step (what ``model_parallel.testing.comm_counter`` counts); the time model turns them into bytes on
the wire with the ring algorithms' factors.

The rooms, each importing only those above it:

- :mod:`~training.plan.shape`: one model's :class:`ModelShape`, counted on the meta device (the
  family rules come from :mod:`training.models`);
- :mod:`~training.plan.inputs`: the :class:`Cluster`, a :class:`Layout` and the :class:`Job` (a run
  config's view: shapes, sequence length, global batch, the DeepSpeed JSON's ZeRO section);
- :mod:`~training.plan.memory` (:data:`MEMORY_TERMS`), :mod:`~training.plan.traffic`
  (:data:`TRAFFIC_KINDS`), :mod:`~training.plan.timing` (the time model): one function per term;
  an on-policy job (``on_policy.fraction`` > 0) adds the student's generation: its KV cache, gathered
  shard and forward temporaries (:data:`GENERATION_TERMS`) and ``generation_s`` (:func:`generation_seconds`);
- :mod:`~training.plan.estimates`: one layout's :class:`Estimate`, whether it fits, :data:`ASSUMPTIONS`;
- :mod:`~training.plan.layouts`: which layouts can run, the candidates, the DeepSpeed values chosen;
- :mod:`~training.plan.compare`: :func:`plan` (every candidate) and :func:`job_plan` (the job's own);
- :mod:`~training.plan.report`: :func:`describe`, the plan as text.

A new memory term or traffic kind goes in its module's tuple and a function there; a new per-loss
figure in ``loss.registry``; a new per-family rule in ``training.models``.
"""

from training.plan.compare import Plan, job_cluster, job_plan, plan
from training.plan.estimates import ASSUMPTIONS, HEADROOM, ON_POLICY_ASSUMPTIONS, Estimate, estimate, fastest_stage
from training.plan.inputs import GB, Cluster, Generation, Job, Layout, job_from_config
from training.plan.layouts import candidate_layouts, configured_layout, deepspeed_settings, layout_problem
from training.plan.memory import (CUDA_CONTEXT_GB, GENERATION_TERMS, MEMORY_TERMS, NCCL_GB_PER_COMMUNICATOR,
                                  activation_bytes, kv_cache_bytes, layer_saved_bytes, logits_bytes, memory_per_gpu,
                                  runtime_reserve, teacher_forward_bytes)
from training.plan.report import describe
from training.plan.shape import MODELS_DIR, ModelShape, UnknownArchitecture, model_shape
from training.plan.timing import (FIXED_COSTS, FixedCosts, decode_ops, fixed_events, fixed_seconds, generation_seconds,
                                  step_seconds)
from training.plan.traffic import TRAFFIC_KINDS, traffic_per_step

__all__ = ["ASSUMPTIONS", "CUDA_CONTEXT_GB", "Cluster", "Estimate", "FIXED_COSTS", "FixedCosts", "GB",
           "GENERATION_TERMS", "Generation", "HEADROOM", "Job", "Layout", "MEMORY_TERMS", "MODELS_DIR", "ModelShape",
           "NCCL_GB_PER_COMMUNICATOR", "ON_POLICY_ASSUMPTIONS", "Plan", "TRAFFIC_KINDS", "UnknownArchitecture",
           "activation_bytes", "candidate_layouts", "configured_layout", "decode_ops", "deepspeed_settings",
           "describe", "estimate", "fastest_stage", "fixed_events", "fixed_seconds", "generation_seconds",
           "job_cluster", "job_from_config", "job_plan", "kv_cache_bytes", "layer_saved_bytes", "layout_problem",
           "logits_bytes", "memory_per_gpu", "model_shape", "plan", "runtime_reserve", "step_seconds",
           "teacher_forward_bytes", "traffic_per_step"]
