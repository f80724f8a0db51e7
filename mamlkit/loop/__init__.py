"""Loop: build a run, meta-train with checkpoints and exact resume, meta-rate schedules, and torchrun
collectives (``loop.distributed``)."""
