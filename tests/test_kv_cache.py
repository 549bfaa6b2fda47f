"""The KV cache by the keyword each transformers release takes (shrink.kv_cache): cached
decoding through it gives the full forward pass's logits, and no deprecation warning."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch

from shrink.kv_cache import cache_arg, cache_kwargs, returned_cache
from shrink.prefix import PrefixCache


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Gemma3ForCausalLM(config).eval()


def no_cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "past_key_values" in str(w.message) or "Use `cache`" in str(w.message)]


def test_cached_decoding_matches_the_full_pass_without_deprecation_warnings():
    model = tiny_gemma3()
    assert cache_arg(model) in inspect.signature(type(model).forward).parameters
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        full = model(input_ids=ids).logits  # (2, 12, vocab)
        out = model(input_ids=ids[:, :5], **cache_kwargs(model, None), use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(5, 12):  # one token at a time, past the sliding window
            out = model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, returned_cache(out)), use_cache=True)
            steps.append(out.logits[:, -1])
    assert not no_cache_warnings(record)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-4, atol=1e-4)


def test_the_prefix_cache_reads_the_cache_by_its_name():
    model = tiny_gemma3()
    row = torch.randint(3, 96, (1, 14), generator=torch.Generator().manual_seed(2))
    ids = row.repeat(2, 1)
    with torch.inference_mode(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prefix = PrefixCache(model, row[0, :9].tolist(), "cpu")
        hidden = prefix.hidden(model, ids, torch.ones_like(ids))  # (2, 5, d)
        full = model.base_model(input_ids=ids).last_hidden_state
    assert not no_cache_warnings(record)
    torch.testing.assert_close(hidden, full[:, 9:], rtol=1e-4, atol=1e-4)


class OldStyle(torch.nn.Module):
    """A forward from before the rename, and a DDP-like wrapper around it."""

    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return input_ids


@dataclasses.dataclass
class OldOutput:
    logits: object = None
    past_key_values: object = None


def test_older_forwards_get_past_key_values():
    wrapper = torch.nn.Module()
    wrapper.module = OldStyle()
    assert cache_kwargs(OldStyle(), "kv") == {"past_key_values": "kv"}
    assert cache_arg(wrapper) == "past_key_values"
    assert returned_cache(OldOutput(logits=1, past_key_values="kv")) == "kv"


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_wrapper_is_looked_through(wrapped):
    model = tiny_gemma3()
    if wrapped:
        outer = torch.nn.Module()
        outer.module = model
        model = outer
    assert cache_arg(model) == cache_arg(tiny_gemma3())
