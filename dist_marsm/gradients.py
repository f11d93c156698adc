"""The gradients a step runs on (layer 3): the closure's, and for ``variant="exact"`` also the gradient of
the current batch at the previous iterate, g(x_{t-1}; batch_t), which the exact MARS correction needs."""

from __future__ import annotations

import torch

from dist_marsm.step_plan import local


def closure_gradients(optimizer, closure, prev_grads: dict):
    """The gradients the step runs on: the closure's (once, or twice for the exact variant), or those there."""
    if any(g["use_mars"] and g["variant"] == "exact" for g in optimizer.param_groups):
        if closure is None:
            raise ValueError(
                "MARSM: variant='exact' needs step(closure): the closure recomputes the loss "
                "and gradients of the current batch at the previous iterate"
            )
        return exact_gradients(optimizer, closure, prev_grads)
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def exact_gradients(optimizer, closure, prev_grads: dict):
    """Gradients at x_{t-1} on the current batch (into ``prev_grads``), then at x_t; returns the loss.

    Every parameter that has a previous iterate is rewound (the AdamW-routed ones too), so the
    correction's gradient is taken at the whole model's x_{t-1}, not at a mix of old and new values.
    Gradients are cleared before each closure call, so a closure that does not zero them is correct too.
    """
    state = optimizer.state
    groups = optimizer.param_groups
    exact = [
        p for g in groups if g["use_mars"] and g["variant"] == "exact" for p in g["params"] if "prev_param" in state[p]
    ]
    rewound = [p for g in groups for p in g["params"] if "prev_param" in state[p]]
    if exact:
        current = [local(p).clone() for p in rewound]
        for p in rewound:
            local(p).copy_(local(state[p]["prev_param"]))
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure()
        for p in exact:
            prev_grads[p] = local(p.grad).clone() if p.grad is not None else torch.zeros_like(local(p))
        for p, saved in zip(rewound, current):
            local(p).copy_(saved)
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        return closure()
