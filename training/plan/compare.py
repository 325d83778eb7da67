"""Comparing layouts: :func:`plan` estimates every candidate of a run config on a cluster and picks
the fastest that fits; :func:`job_plan` estimates the job's own layout on the cluster it runs on."""

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

from core.errors import ConfigError
from training.plan.estimates import Estimate, assumptions, estimate
from training.plan.inputs import GB, Cluster, Generation, job_from_config
from training.plan.layouts import candidate_layouts, configured_layout, deepspeed_settings, layout_problem
from training.plan.memory import memory_terms
from training.plan.traffic import TRAFFIC_KINDS


@dataclass
class Plan:
    """The layouts compared, the fastest that fits (``chosen``) and the one asked about (``shown``)."""

    cluster: Cluster
    estimates: List[Estimate]
    chosen: Optional[Estimate]
    shown: Estimate
    smallest_cluster: Optional[Cluster] = None
    """Where nothing fits: the fewest nodes of these GPUs on which something would."""
    deepspeed: Dict[str, object] = field(default_factory=dict)
    """:func:`~training.plan.layouts.deepspeed_settings` for ``shown``."""
    fused_head: bool = False
    """The logits term is the fused head's (:attr:`~training.plan.inputs.Job.fused_head`)."""
    generation: Optional[Generation] = None
    """The job's on-policy generation (:attr:`~training.plan.inputs.Job.generation`; None off-policy)."""

    def to_json(self) -> dict:
        """The plan as one JSON object; ``generation_s`` (expected seconds per step generating, inside
        ``step_time_s``) and ``phase_overlap_bytes`` (subtracted from the terms' sum for the peak) are
        0 off-policy, where ``memory`` has no generation terms."""
        shown = self.shown
        return {"estimate": True, "assumptions": list(assumptions(self.generation is not None)),
                "cluster": asdict(self.cluster), "memory": shown.memory, "traffic": shown.traffic,
                "peak_memory_bytes": shown.peak_memory_bytes, "reserve_bytes": shown.reserve,
                "phase_overlap_bytes": shown.overlap, "step_time_s": shown.step_time_s,
                "generation_s": shown.seconds.get("generation", 0.0),
                "generation": asdict(self.generation) if self.generation else None,
                "seconds": shown.seconds, "bottleneck": shown.bottleneck, "fits": shown.fits,
                "layout": shown.layout.as_config(), "set_arguments": shown.layout.set_arguments(),
                "deepspeed": self.deepspeed, "fused_head": self.fused_head,
                "recommended": self.chosen.layout.as_config() if self.chosen else None,
                "smallest_cluster": asdict(self.smallest_cluster) if self.smallest_cluster else None,
                "layouts": [{"layout": e.layout.as_config(), "peak_memory_bytes": e.peak_memory_bytes,
                             "step_time_s": e.step_time_s, "fits": e.fits, "rejected": e.rejected}
                            for e in self.estimates]}


def _fastest(estimates: List[Estimate]) -> Optional[Estimate]:
    """The fastest estimate that fits, or None. Ties (within 0.1%) go to the larger micro-batch,
    then to no recomputation, then to the lower stage."""
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda e: (round(e.step_time_s, 3), -e.layout.micro_batch_size,
                                       e.layout.activation_checkpointing, e.layout.student_zero_stage))


def _compare(cfg, cluster: Cluster, *, bf16: Optional[bool], device_type: str):
    """``(job_for_tp, own layout, estimates, fastest that fits or None)`` of every candidate layout of
    ``cfg`` on ``cluster``. Raises ConfigError naming the key when the config's own layout cannot
    run on ``cluster`` at all."""
    jobs = {}

    def job_for_tp(tp):
        if tp not in jobs:
            jobs[tp] = job_from_config(cfg, world_size=cluster.world_size, tp=tp, bf16=bf16)
        return jobs[tp]

    own = configured_layout(cfg)
    problem = layout_problem(job_for_tp(own.tensor_parallel), own, cluster)
    if problem:
        raise ConfigError(f"{problem} (on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs)")
    estimates = []
    for layout in candidate_layouts(job_for_tp, cluster):
        job = job_for_tp(layout.tensor_parallel)
        problem = layout_problem(job, layout, cluster)
        if problem:
            estimates.append(Estimate(layout, dict.fromkeys(memory_terms(job), 0.0), dict.fromkeys(TRAFFIC_KINDS, 0.0),
                                      {"compute": 0.0}, rejected=problem))
        else:
            estimates.append(estimate(job, layout, cluster, device_type=device_type))
    return job_for_tp, own, estimates, _fastest(estimates)


def plan(cfg, cluster: Cluster, *, as_configured: bool = False, bf16: Optional[bool] = None,
         device_type: str = "cuda") -> Plan:
    """Compare every layout of ``cfg`` on ``cluster``; ``shown`` is the fastest that fits, or the
    config's own with ``as_configured`` (or where nothing fits). Raises ConfigError naming the key
    when the config's own layout cannot run on ``cluster`` at all."""
    job_for_tp, own, estimates, chosen = _compare(cfg, cluster, bf16=bf16, device_type=device_type)
    own_estimate = estimate(job_for_tp(own.tensor_parallel), own, cluster, device_type=device_type)
    shown = own_estimate if as_configured or chosen is None else chosen
    smallest = None
    if chosen is None:
        smallest = _smallest_cluster(cfg, cluster, bf16=bf16, device_type=device_type)
    shown_job = job_for_tp(shown.layout.tensor_parallel)
    return Plan(cluster=cluster, estimates=estimates, chosen=chosen, shown=shown, smallest_cluster=smallest,
                deepspeed=deepspeed_settings(shown_job, shown.layout), fused_head=shown_job.fused_head,
                generation=shown_job.generation)


def _smallest_cluster(cfg, cluster: Cluster, **options) -> Optional[Cluster]:
    """The fewest nodes (up to 64) of ``cluster``'s GPUs on which some layout of ``cfg`` fits (the
    global batch, micro-batch x grad_accum x data-parallel ranks, grows with the cluster). Each
    size is compared once (a size where nothing fits does not search again)."""
    for nodes in range(cluster.nodes + 1, 65):
        bigger = replace(cluster, nodes=nodes)
        try:
            if _compare(cfg, bigger, **options)[3] is not None:
                return bigger
        except ConfigError:
            continue
    return None


def job_cluster(world_size: int, device) -> Cluster:
    """The cluster the job runs on, as far as a process can see it: GPUs per node from the
    launcher's ``LOCAL_WORLD_SIZE`` (else the visible devices), the accelerator's memory (on CPU the
    host memory shared by the node's ranks); throughput and links at :class:`Cluster`'s defaults."""
    import psutil
    import torch

    device = torch.device(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (
        torch.cuda.device_count() if device.type == "cuda" else world_size)
    local = local if local and world_size % local == 0 else world_size
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = psutil.virtual_memory().total / local
    return Cluster(nodes=world_size // local, gpus_per_node=local, gpu_memory_gb=memory / GB)


def job_plan(cfg, *, world_size: int, bf16: bool, device) -> Plan:
    """The plan of the job's own layout on the cluster it runs on (``plan(..., as_configured=True)``).

    Raises, by design only: :class:`ConfigError` (a layout that cannot run, a model source that cannot
    be found, a bad DeepSpeed JSON), :class:`~training.plan.shape.UnknownArchitecture` (a ConfigError:
    a model the planner cannot shape offline) and ``OSError`` (a config file that cannot be read)."""
    import torch

    cluster = job_cluster(world_size, device)
    layout = configured_layout(cfg)
    job = job_from_config(cfg, world_size=world_size, bf16=bf16)
    problem = layout_problem(job, layout, cluster)
    if problem:
        raise ConfigError(problem)
    own = estimate(job, layout, cluster, device_type=torch.device(device).type)
    return Plan(cluster=cluster, estimates=[own], chosen=own if own.fits else None, shown=own,
                fused_head=job.fused_head, generation=job.generation)
