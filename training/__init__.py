"""The distillation job's library: config, engines, the training step, checkpoints, export.

``launch/`` holds only the entry points that parse, build, train and clean up with these.
"""
