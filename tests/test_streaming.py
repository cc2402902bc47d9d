"""The layer-by-layer loop reproduces a full forward pass, and resumes from saved hidden states."""

from __future__ import annotations

import torch

from pipeline.models import get_adapter
from pipeline.streaming import stream_layers
from tests.factory import tiny_model

CPU = torch.device("cpu")


def _moe_inputs_by_hooks(model, adapter, ids):
    """Reference: the MoE block inputs seen during one ordinary full forward pass."""
    seen = {}
    handles = [
        adapter.moe_block(layer).register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0].detach()))
        for i, layer in enumerate(adapter.decoder_layers(model))
    ]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    return seen, out.hidden_states


def test_streamed_moe_inputs_equal_full_forward():
    model = tiny_model("mixtral", layers=3)
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    reference, hidden_states = _moe_inputs_by_hooks(model, adapter, ids)
    steps = list(stream_layers(model, adapter, ids, batch_size=2, device=CPU, progress=False))
    assert [s.index for s in steps] == [0, 1, 2]
    for step in steps:
        x = torch.cat(step.moe_input)
        torch.testing.assert_close(x, reference[step.index], rtol=1e-5, atol=1e-5)
        # the decoder-layer input is the model's own hidden state, and the MoE input is its
        # attention output passed through the layer's post-attention norm
        torch.testing.assert_close(torch.cat(step.hidden_in), hidden_states[step.index], rtol=1e-5, atol=1e-5)


def test_resume_from_saved_hidden_states_is_identical():
    model = tiny_model("mixtral", layers=3)
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    full = {s.index: (torch.cat(s.moe_input), [h.clone() for h in s.hidden_in]) for s in stream_layers(model, adapter, ids, batch_size=2, device=CPU, progress=False)}
    resumed = list(stream_layers(model, adapter, ids, batch_size=2, device=CPU, start_layer=2, start_hidden=full[2][1], progress=False))
    assert [s.index for s in resumed] == [2]
    assert torch.equal(torch.cat(resumed[0].moe_input), full[2][0])


def test_replaced_block_feeds_the_next_layer():
    model = tiny_model("mixtral", layers=2)
    adapter = get_adapter(model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    baseline = [torch.cat(s.moe_input) for s in stream_layers(model, adapter, ids, batch_size=2, device=CPU, progress=False)]
    changed = []
    for step in stream_layers(model, adapter, ids, batch_size=2, device=CPU, progress=False):
        changed.append(torch.cat(step.moe_input))
        if step.index == 0:
            pruned = adapter.prune_block(step.block, [0, 1, 2, 3], adapter.pruned_config(model.config, 4), 0)
            step.replace_block(adapter, pruned)
    assert torch.equal(changed[0], baseline[0])
    assert not torch.allclose(changed[1], baseline[1])
