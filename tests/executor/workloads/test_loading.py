"""Loading any model the profile command names, and the samples made for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor.workloads.loading import is_chain, load_any_model, make_sample, resolve_leaves


def test_built_ins_and_examples() -> None:
    model, sample, info = load_any_model("gpt-tiny", 3)
    assert is_chain(model) and sample.shape == (3, 32) and info["kind"] == "tokens"
    model, sample, _ = load_any_model("tiny-unet", 2)
    assert not is_chain(model) and sample.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="neither a built-in model"):
        load_any_model("no-such-model", 2)


def test_transformers_samples_follow_the_config() -> None:
    tf = pytest.importorskip("transformers")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2))
    ids = make_sample(gpt2, 2, seq_len=7)["input_ids"]
    assert ids.shape == (2, 7) and int(ids.max()) < 50 and ids.dtype == torch.int64
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=8, image_size=16, patch_size=8))
    assert make_sample(vit, 2)["pixel_values"].shape == (2, 3, 16, 16)


def test_other_models_need_a_shape_or_a_sample_function() -> None:
    assert make_sample(nn.Linear(3, 2), 2, sample_fn=lambda b: torch.zeros(b, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="give --input-shape"):
        make_sample(nn.Linear(3, 2), 2)
    assert resolve_leaves(["torch.nn:ReLU", "h.*"]) == [nn.ReLU, "h.*"]
    with pytest.raises(TypeError, match=r"not an nn\.Module class"):
        resolve_leaves(["math:sqrt"])
