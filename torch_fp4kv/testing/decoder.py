"""Greedy decoding with the step captured in a CUDA graph: what an engine's decode loop does."""

from __future__ import annotations

import torch
from torch import nn


class Decoder:
    """Prefills `prompt` [B, P], then decodes one token per sequence per `step()`. Owns the step's
    static inputs and, when `use_graph`, its CUDA graph (captured after one warm-up step on a side
    stream, so Triton compiles and NCCL communicators start outside the capture).

    `prefill_logits` holds the prompt's logits [B, P, V], `logits` the last step's [B, 1, V] (on a
    graph, the same tensor every step), and `tokens` the next input: the greedy choice of the
    latest logits. Capturing the graph runs a step, so the inputs are rewound afterwards: with or
    without a graph, step k decodes the same token at the same position.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, use_graph: bool):
        self.model = model
        self.graph = None
        with torch.no_grad():
            self.prefill_logits = model(prompt, torch.zeros(1, dtype=torch.long, device=prompt.device))
        self.logits = self.prefill_logits
        self.tokens = self.prefill_logits[:, -1:].argmax(-1)
        self.pos = torch.full((1,), prompt.shape[1], dtype=torch.long, device=prompt.device)
        if use_graph:
            self._capture()

    def _capture(self) -> None:
        first_tokens, first_pos = self.tokens.clone(), self.pos.clone()
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()  # warm-up: compiles kernels, starts communicators; writes one cache slot
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
        self.tokens.copy_(first_tokens)
        self.pos.copy_(first_pos)

    def _step(self) -> None:
        self.logits = self.model(self.tokens, self.pos)
        self.tokens.copy_(self.logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self._step()

    def release(self) -> None:
        """Free the CUDA graph now. A graph holding NCCL collectives must go before its process
        group: NCCL (2.26 on) waits in ncclCommDestroy until every graph using the communicator is gone."""
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
