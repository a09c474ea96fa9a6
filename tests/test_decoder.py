"""The decode loop the examples share: a CUDA-graph run decodes what an eager run decodes.

Capturing a graph runs the step (a warm-up, then the capture itself), which advances the step's
inputs; the decoder must rewind them. The CUDA calls are replaced by stand-ins that run the step
eagerly, so this runs (and would have caught the missing rewind) without a GPU."""

import contextlib

import torch

from torch_fp4kv.testing import decoder as decoder_module
from torch_fp4kv.testing.decoder import Decoder
from torch_fp4kv.testing.llama import Config, build_model, random_weights

CFG = Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=128,
             max_seq_len=32, max_batch=2)


class _EagerGraph:
    """torch.cuda.CUDAGraph's stand-in: the captured body runs eagerly, replay() re-runs the step."""

    step = None

    def replay(self):
        _EagerGraph.step()

    def reset(self):
        pass


def _fake_cuda(monkeypatch):
    cuda = decoder_module.torch.cuda
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})()
    monkeypatch.setattr(cuda, "Stream", lambda: stream)
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(cuda, "CUDAGraph", _EagerGraph)
    monkeypatch.setattr(cuda, "graph", lambda graph: contextlib.nullcontext())


def _decode(use_graph: bool, steps: int = 6):
    model = build_model(CFG, "nvfp4", random_weights(CFG, seed=0, dtype=torch.float32), "cpu", torch.float32)
    prompt = torch.randint(0, CFG.vocab_size, (CFG.max_batch, 5), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(model, prompt, use_graph)
    _EagerGraph.step = decoder._step
    tokens, logits = [decoder.tokens.clone()], [decoder.prefill_logits]
    for _ in range(steps):
        decoder.step()
        tokens.append(decoder.tokens.clone())
        logits.append(decoder.logits.clone())
    return torch.cat(tokens, 1), torch.cat(logits, 1), decoder.prefill_logits


def test_graph_capture_rewinds_the_step_inputs(monkeypatch):
    eager_tokens, eager_logits, prefill = _decode(use_graph=False)
    _fake_cuda(monkeypatch)
    graph_tokens, graph_logits, _ = _decode(use_graph=True)
    assert torch.equal(graph_tokens, eager_tokens)
    assert torch.equal(graph_logits, eager_logits)
    # the first decoded token is the prompt's greedy continuation
    assert torch.equal(eager_tokens[:, :1], prefill[:, -1:].argmax(-1))
