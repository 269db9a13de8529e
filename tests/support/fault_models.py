"""Models for fault-injection tests, loaded by actors through ``model.kind: callable``.

``marked_digits`` is the zoo's digits CNN whose forward pass, inside a Ray actor, leaves a marker
file ``<node id>-<pid>`` in ``marker_dir`` and then sleeps ``delay`` seconds: a test that sees the
marker knows that this process is in the middle of a unit right now, and on which node, so it can
kill the process or remove the node *while a unit runs*. Outside Ray (the driver's probe, the
in-process reference run) it is the plain model. Same weights either way, so stores compare equal.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn


class _Marked(nn.Module):
    def __init__(self, inner: nn.Module, marker_dir: str, delay: float):
        super().__init__()
        self.inner = inner
        self.marker_dir = marker_dir
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.marker_dir:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                node = ray.get_runtime_context().get_node_id()
                open(os.path.join(self.marker_dir, f"{node}-{os.getpid()}"), "a").close()
                time.sleep(self.delay)
        return self.inner(x)


def marked_digits(marker_dir: str = "", delay: float = 0.0) -> nn.Module:
    from distributed_attr import zoo

    model, _ = zoo.pretrained("digits_cnn")
    return _Marked(model, marker_dir, delay)


def random_digits_vit():
    """The zoo's digit-size ViT with random weights (seeded) and a random head: torchvision
    starts the head at zero, which would make every gradient (and gradient relevance) zero."""
    import torch
    from torch import nn

    from distributed_attr import zoo

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = zoo.DigitsViT()
        nn.init.normal_(model.vit.heads.head.weight, std=0.5)
    return model


def zero_head_digits():
    """The zoo's trained digits CNN with its classifier zeroed (weights and bias): every logit is
    0, every class has probability 0.1, and the gradient of any target is zero everywhere, as
    with a torchvision ViT's zero-initialised head."""
    import torch

    from distributed_attr import zoo

    model, _ = zoo.pretrained("digits_cnn")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    return model
