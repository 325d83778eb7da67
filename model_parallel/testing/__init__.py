"""Instruments for tests and benchmarks; the training job never imports them.

- :mod:`model_parallel.testing.device_check`: ``one_device``, the one-device discipline checked on
  a CPU-only machine (library tensors without ``device=`` land on ``meta``, collectives check their
  tensors' device);
- :mod:`model_parallel.testing.comm_counter`: ``count_collective_bytes``, the bytes and calls each
  rank hands to ``torch.distributed`` collectives (DeepSpeed's included);
- :mod:`model_parallel.testing.memory_counter`: ``LiveBytes``, the peak bytes of the tensors a
  block allocates and keeps alive.

They patch ``torch.distributed`` or install torch modes, and cost a frame walk or a dispatch per op,
so only ``tests/`` and ``benchmarks/`` use them. ``model_parallel.spawn`` (running a function on N
local ranks) is not here: ``launch/export.py`` runs on it.
"""
