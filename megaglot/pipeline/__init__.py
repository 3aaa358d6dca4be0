"""Pipeline parallelism: point-to-point exchange (`p2p`), schedules (`schedules`) and timelines.

`forward_backward(chunks, microbatches, forward_step, *, tensor_shape, dtype, forward_only=False,
timeline=None, device=None, stats=None)` runs no pipelining, 1F1B or interleaved 1F1B as
`megaglot.parallel.state` says. Works on any list of model chunks; knows nothing of GPT-NeoX.
"""

from megaglot.pipeline.schedules import ScheduleStats, activation_bound, check_schedule, forward_backward
from megaglot.pipeline.timeline import Timeline, bubble_fraction, theoretical_bubble_fraction

__all__ = ["forward_backward", "check_schedule", "activation_bound", "ScheduleStats",
           "Timeline", "bubble_fraction", "theoretical_bubble_fraction"]
