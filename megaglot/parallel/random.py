"""Model-parallel RNG and activation recomputation.

Dropout on activations that are split over TP (attention probabilities of this rank's heads)
must differ per TP rank, while dropout on replicated activations must match on every TP rank, or
the replicas drift apart. The tracker keeps named generator states: the default generator is
seeded identically over TP, and `fork("model-parallel-rng")` swaps in a per-TP-rank state.

`checkpoint(fn, *args)` drops fn's activations in forward and recomputes them in backward with
the RNG states (CPU, CUDA and the tracker's) restored, so recomputed dropout masks are the same.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

from megaglot.parallel import state

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _device_get_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _device_set_state(new_state: torch.Tensor) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(new_state)
    else:
        torch.set_rng_state(new_state)


class RNGStatesTracker:
    """Named states of the device generator (CUDA when present, else CPU)."""

    def __init__(self):
        self.states: Dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _device_get_state()
        torch.manual_seed(seed) if not torch.cuda.is_available() else torch.cuda.manual_seed(seed)
        self.states[name] = _device_get_state()
        _device_set_state(saved)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {name: s.clone() for name, s in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {name: s.clone() for name, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block on the named generator state, then return to the default one."""
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} was never added; call model_parallel_seed(seed) first")
        saved = _device_get_state()
        _device_set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _device_get_state()
            _device_set_state(saved)


class _TrackerRegistry:
    tracker = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TrackerRegistry.tracker


def model_parallel_seed(seed: int) -> None:
    """Seed the default generator alike on TP ranks (offset by pipeline stage) and the tracker per TP rank.

    Pipeline stages hold different layers, so their default streams need not match; TP ranks of
    one stage must share the default stream. The tracker's stream differs per TP rank.
    """
    pp_rank = state.get_pipeline_parallel_rank()
    tp_rank = state.get_tensor_parallel_rank()
    default_seed = seed + 100 * pp_rank
    tensor_parallel_seed = default_seed + 2718 + tp_rank
    torch.manual_seed(default_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(default_seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, tensor_parallel_seed)


def _capture_rng():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, get_rng_tracker().get_states()


def _restore_rng(saved) -> None:
    cpu, cuda, tracker_states = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    get_rng_tracker().set_states(tracker_states)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.rng_before = _capture_rng()
        with torch.no_grad():
            outputs = fn(*args)
        tensors = [a if torch.is_tensor(a) else None for a in args]
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        ctx.arg_layout = [(torch.is_tensor(a), None if torch.is_tensor(a) else a) for a in args]
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = iter(ctx.saved_tensors)
        inputs = []
        for is_tensor, value in ctx.arg_layout:
            if is_tensor:
                t = next(saved)
                t = t.detach().requires_grad_(t.requires_grad)
                inputs.append(t)
            else:
                inputs.append(value)
        rng_after_forward = _capture_rng()
        _restore_rng(ctx.rng_before)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*inputs)
        finally:
            _restore_rng(rng_after_forward)
        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(t.grad if torch.is_tensor(t) else None for t in inputs)
        return (None,) + grads


def checkpoint(fn, *args):
    """fn(*args) without keeping its activations; recomputed in backward with identical RNG."""
    return _Checkpoint.apply(fn, *args)
