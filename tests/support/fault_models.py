"""Models for fault-injection tests, loaded by actors through ``model.kind: callable``.

``marked_digits`` is the zoo's digits CNN whose forward pass, inside a Ray actor, leaves a marker
file ``<node id>-<pid>`` in ``marker_dir`` and then sleeps ``delay`` seconds: a test that sees the
marker knows that this process is in the middle of a unit right now, and on which node, so it can
kill the process or remove the node *while a unit runs*. With ``by_actor`` the marker is named by
the Ray actor's id instead (``ActorID.hex()``), for a test that holds an actor handle and kills
that actor with ``ray.kill``, and the forward pass sleeps only when it creates the marker: a test
deletes the marker, and the actor's next forward pass writes it and waits for the kill. Outside Ray (the driver's probe, the in-process reference run) it is
the plain model. Same weights either way, so stores compare equal.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn


class _Marked(nn.Module):
    def __init__(self, inner: nn.Module, marker_dir: str, delay: float, by_actor: bool = False):
        super().__init__()
        self.inner = inner
        self.marker_dir = marker_dir
        self.delay = delay
        self.by_actor = by_actor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.marker_dir:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                context = ray.get_runtime_context()
                name = context.get_actor_id() if self.by_actor else f"{context.get_node_id()}-{os.getpid()}"
                path = os.path.join(self.marker_dir, name)
                fresh = not os.path.exists(path)
                open(path, "a").close()
                if fresh or not self.by_actor:  # by actor: sleep only when the marker is new
                    time.sleep(self.delay)
        return self.inner(x)


def marked_digits(marker_dir: str = "", delay: float = 0.0, by_actor: bool = False) -> nn.Module:
    from distributed_attr import zoo

    model, _ = zoo.pretrained("digits_cnn")
    return _Marked(model, marker_dir, delay, by_actor)


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
