"""The one inference every adapter shares: names read as words, arrays as evidence."""

from __future__ import annotations

import pytest

from decaymask.core._infer import content_kind, resolve_kind
from decaymask.core._names import name_kind, words
from decaymask.core._roles import role_from_name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("RobertaPreLayerNormLMHead", ("roberta", "pre", "layer", "norm", "lm", "head")),
        ("SimpleNorm2d", ("simple", "norm", "2d")),
        ("FlaxConv1D", ("flax", "conv", "1d")),
        ("Wav2Vec2EncoderStableLayerNorm", ("wav", "2", "vec", "2", "encoder", "stable", "layer", "norm")),
        ("A_log", ("A", "log")),
        ("B", ("B",)),
        ("ln_f", ("ln", "f")),
        ("Dense_3", ("dense", "3")),
    ],
)
def test_words(name, expected):
    assert words(name) == expected


@pytest.mark.parametrize(
    "name, kind",
    [
        # The head word decides.
        ("RobertaPreLayerNormLMHead", "container"),
        ("FlaxRobertaPreLayerNormSelfAttention", "attention"),
        ("lm_head", "container"),
        ("SimpleNorm2d", "norm"),
        ("pre_self_attention_norm", "norm"),
        ("conv_norm_out", "norm"),
        ("mm_soft_embedding_norm", "norm"),
        # A name starting with a norm word is a norm of what follows.
        ("norm_final_attn", "norm"),
        ("LlamaRMSNorm", "rms_norm"),
        ("input_layernorm", "layer_norm"),
        ("ln_f", "layer_norm"),
        ("bn1", "batch_norm"),
        ("gn", "group_norm"),
        ("Dense_3", "linear"),
        ("ConvTranspose_0", "conv"),
        ("OptimizedLSTMCell", "recurrent"),
        ("MultiHeadDotProductAttention", "attention"),
        ("wte", "embedding"),
        # A word glued from known words is read as them, as its CamelCase spelling
        # `RobertaPreLayerNorm` is; words inside other words are not read.
        ("roberta_prelayernorm", "layer_norm"),
        ("normal", None),
        ("embedder", None),
        ("q_proj", None),
        ("SqueezeExcitation", None),
    ],
)
def test_name_kind(name, kind):
    assert name_kind(name) == kind


@pytest.mark.parametrize(
    "name, arrays, children, expected",
    [
        # transformers' GPT-2 linear layer: the name says conv, a 2-D kernel says linear.
        ("FlaxConv1D", {"kernel": 2, "bias": 1}, (), ("linear", "content")),
        # A patch embedding holding a conv kernel (Flax's ViT tutorial, DINOv3).
        ("patch_embeddings", {"kernel": 4, "bias": 1}, (), ("conv", "content")),
        # A conv inside a module named attention (RegNet's squeeze-excitation).
        ("attention", {"kernel": 4, "bias": 1}, (), ("conv", "content")),
        # A norm named after what it follows.
        ("norm_final_attn", {"scale": 1, "bias": 1}, (), ("layer_norm", "name")),
        ("SimpleNorm2d", {"weight": 1}, (), ("rms_norm", "name")),
        ("group_norm", {"scale": 1, "bias": 1}, (), ("group_norm", "name")),
        # A norm-named container owning only submodules is not a norm.
        ("Wav2Vec2EncoderStableLayerNorm", {}, ("layers", "layer_norm"), ("unknown", "name")),
        # Flax's fused Linear+BatchNorm block: neither a linear layer nor a norm.
        ("block", {"w": 2, "b": 1, "scale": 1, "bias": 1}, (), ("unknown", "content")),
        ("fc1", {"kernel": 2, "bias": 1}, (), ("linear", "content")),
        # A lone 2-D weight is a table or a matrix: the name settles it.
        ("LearnedPosEmbed", {"weight": 2}, (), ("embedding", "name")),
        ("LearnedPosEmbed", {"weight": 2, "bias": 1}, (), ("linear", "content")),
        ("proj", {"kernel": 3, "bias": 2}, (), ("linear", "content")),
        ("cell", {}, ("ir", "iz", "in", "hr", "hz", "hn"), ("recurrent", "content")),
        ("attn", {}, ("q", "k"), ("attention", "name")),
    ],
)
def test_resolve_kind(name, arrays, children, expected):
    assert resolve_kind(name, arrays, children) == expected


def test_content_kind():
    assert content_kind({"embedding": 2}) == "embedding"
    assert content_kind({"mean": 1, "var": 1}) == "batch_norm"
    assert content_kind({"scale": 1}) == "rms_norm"
    assert content_kind({"negative_slope": 0}) == "prelu"
    assert content_kind({"kernel": 4, "bias": 1}) == "conv"
    assert content_kind({"kernel": 2, "scale": 1}) is None
    assert content_kind({"mystery": 2}) is None


@pytest.mark.parametrize(
    "kind, name, owner, role",
    [
        ("unknown", "B", "", "other"),  # a state-space matrix, not a bias
        ("unknown", "b", "", "bias"),
        ("linear", "in_proj_bias", "", "bias"),
        ("unknown", "dt_bias", "", "bias"),
        ("unknown", "final_logits_bias", "", "bias"),
        ("unknown", "relative_position_bias_table", "", "position"),
        ("unknown", "pos_embed", "", "position"),
        ("unknown", "absolute_pos_embed", "", "position"),
        ("unknown", "position_embeddings", "", "position"),
        ("embedding", "embedding", "position_embeddings", "position"),
        ("embedding", "embedding", "wpe", "position"),
        ("embedding", "embedding", "embed_positions", "position"),
        ("embedding", "weight", "LearnedPosEmbed", "position"),
        ("embedding", "embedding", "token_type_embeddings", "embedding"),
        ("unknown", "cls_token", "", "token"),
        ("unknown", "cls", "", "token"),
        ("unknown", "reg_tokens", "", "token"),
        ("unknown", "register_tokens", "", "token"),
        ("unknown", "mask_token", "", "token"),
        ("unknown", "dist_token", "", "token"),
        ("unknown", "masked_spec_embed", "", "token"),
        ("unknown", "class_embedding", "", "token"),
        ("unknown", "gamma", "", "gain"),
        ("layer_norm", "gamma", "", "scale"),
        ("unknown", "lambda_1", "", "gain"),
        ("linear", "g", "", "gain"),
        ("conv", "weight_g", "", "gain"),
        ("conv", "weight_v", "", "weight"),
        ("unknown", "alpha", "", "gain"),
        ("unknown", "logit_scale", "", "gain"),
        ("unknown", "A_log", "", "gain"),
        ("unknown", "D", "", "gain"),
        ("unknown", "inv_freq", "", "buffer"),
        ("unknown", "freqs", "", "buffer"),
        ("unknown", "relative_coords_table", "", "buffer"),
        ("unknown", "in_proj_weight", "", "weight"),
        ("layer_norm", "offset", "", "bias"),
        ("recurrent", "bias_n", "", "bias"),
        ("rms_norm", "weight", "", "scale"),
        ("linear", "kernel", "", "weight"),
    ],
)
def test_role_from_name(kind, name, owner, role):
    assert role_from_name(kind, name, owner) == role
