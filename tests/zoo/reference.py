"""What every array of the zoo models is, written from the models' own code.

A reference is a short list of rules over path patterns, each read off the model's
source (the class that creates the array and how the array is used), never off what
decaymask reports. ``labels(model)`` applies them and checks that every leaf is covered by
exactly one rule and that every rule covers some leaf, so a leaf a new version adds, or a
rule that went stale, is an error here rather than a silent gap.

Judgement calls, each from how the code uses the array: a learned position table is role
``position`` whether it is a bare parameter (ViT's ``position_embeddings``) or an
``nn.Embed`` looked up with position ids (BERT's ``position_embeddings``, GPT-2's ``wpe``,
BART's ``embed_positions``); CLIP's ``logit_scale`` (``exp`` of it multiplies the logits)
and Mamba-2's ``D`` (``y + x * D``) are gains, and so is Mamba-2's ``A_log`` (``exp`` of
it scales the state's decay; Mamba's own recipe marks it ``_no_weight_decay``); FasterViT's coordinate tables, read through ``stop_gradient``, are buffers.

The preset oracles below follow the presets' documented meaning in the project's design
notes, on these labels only. The recipes are the masks the models' own training code
builds, written as code, to check the labels against something independent.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

# Layouts of weight arrays: which axes Muon reduces over and which it outputs.
IN_OUT = "in_out"  # (in, out): Flax Dense kernels
OUT_IN = "out_in"  # (out, in): Equinox Linear, transformers' FlaxConv1D
WINDOW_IN_OUT = "window_in_out"  # (*window, in, out): Flax Conv kernels
OUT_IN_WINDOW = "out_in_window"  # (out, in, *window): Equinox Conv, a torch-layout kernel

NORMS = frozenset({"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"})
NEVER_DECAYED = frozenset({"position", "token", "gain", "buffer"})


def muon_axes(layout: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(reduction axes, output axes) of a weight of this layout and rank."""
    if layout == IN_OUT:
        return (0,), (1,)
    if layout == OUT_IN:
        return (1,), (0,)
    if layout == WINDOW_IN_OUT:
        return tuple(range(ndim - 1)), (ndim - 1,)
    if layout == OUT_IN_WINDOW:
        return tuple(range(1, ndim)), (0,)
    raise ValueError(f"unknown layout {layout!r}")


@dataclasses.dataclass(frozen=True)
class Label:
    """What one array is: its layer's kind, its role, and for weights its layout."""

    kind: str
    role: str
    layout: str | None = None


@dataclasses.dataclass(frozen=True)
class Layer:
    """Every array of the modules whose path matches ``module``; roles by array name."""

    module: str
    kind: str
    names: dict[str, str]
    layout: str | None = None

    def match(self, path: str) -> Label | None:
        head, _, name = path.rpartition("/")
        if name in self.names and re.fullmatch(self.module, head):
            role = self.names[name]
            return Label(self.kind, role, self.layout if role == "weight" else None)
        return None


@dataclasses.dataclass(frozen=True)
class Array:
    """The arrays whose whole path matches ``path``."""

    path: str
    kind: str
    role: str
    layout: str | None = None

    def match(self, path: str) -> Label | None:
        if re.fullmatch(self.path, path):
            return Label(self.kind, self.role, self.layout)
        return None


# Parameter names by framework: Flax's Dense/Conv/Embed/norms, Equinox's Linear/Conv/norms.
FLAX_LINEAR = {"kernel": "weight", "bias": "bias"}
FLAX_NORM = {"scale": "scale", "bias": "bias"}
EQX_LINEAR = {"weight": "weight", "bias": "bias"}
EQX_NORM = {"weight": "scale", "bias": "bias"}


def dense(module: str, layout: str = IN_OUT) -> Layer:
    return Layer(module, "linear", FLAX_LINEAR, layout)


def flax_conv(module: str) -> Layer:
    return Layer(module, "conv", FLAX_LINEAR, WINDOW_IN_OUT)


def flax_norm(module: str, kind: str = "layer_norm") -> Layer:
    return Layer(module, kind, FLAX_NORM)


def eqx_linear(module: str) -> Layer:
    return Layer(module, "linear", EQX_LINEAR, OUT_IN)


def eqx_conv(module: str) -> Layer:
    return Layer(module, "conv", EQX_LINEAR, OUT_IN_WINDOW)


def eqx_norm(module: str, kind: str = "layer_norm") -> Layer:
    return Layer(module, kind, EQX_NORM)


N = r"\d+"  # a layer index

# --- transformers 4.57.6, Flax ------------------------------------------------------------

REFERENCES: dict[str, list[Layer | Array]] = {}

REFERENCES["gpt2"] = [
    # FlaxConv1D: `self.param("kernel", ..., (features, in))`, then `kernel.transpose()`
    # contracted with the input's last axis: a linear layer stored (out, in).
    dense(rf"transformer/h/{N}/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)", OUT_IN),
    flax_norm(rf"transformer/(h/{N}/ln_[12]|ln_f)"),
    Array(r"transformer/wte/embedding", "embedding", "embedding"),
    # `wpe = nn.Embed(max_position_embeddings, ...)`, looked up with position_ids.
    Array(r"transformer/wpe/embedding", "embedding", "position"),
]

_BERT_LAYER = (
    r"attention/self/(query|key|value)|attention/output/dense|intermediate/dense|output/dense"
)
REFERENCES["bert"] = [
    dense(
        rf"bert/encoder/layer/{N}/({_BERT_LAYER})|bert/pooler/dense"
        r"|cls/predictions/transform/dense|cls/seq_relationship"
    ),
    flax_norm(r".*/LayerNorm"),
    Array(r"bert/embeddings/(word|token_type)_embeddings/embedding", "embedding", "embedding"),
    Array(r"bert/embeddings/position_embeddings/embedding", "embedding", "position"),
    # FlaxBertLMPredictionHead: the decoder is tied to the word embeddings (no kernel of
    # its own) and `self.bias = self.param("bias", ...)` is added to the logits.
    Array(r"cls/predictions/bias", "unknown", "bias"),
]

REFERENCES["roberta_prelayernorm"] = [
    dense(rf"roberta_prelayernorm/encoder/layer/{N}/({_BERT_LAYER})|lm_head/dense"),
    flax_norm(
        r"roberta_prelayernorm/(LayerNorm|embeddings/LayerNorm"
        rf"|encoder/layer/{N}/(attention|intermediate)/LayerNorm)|lm_head/layer_norm"
    ),
    Array(
        r"roberta_prelayernorm/embeddings/(word|token_type)_embeddings/embedding",
        "embedding",
        "embedding",
    ),
    Array(
        r"roberta_prelayernorm/embeddings/position_embeddings/embedding", "embedding", "position"
    ),
    # FlaxRobertaPreLayerNormLMHead: tied decoder, `self.bias` added to the logits.
    Array(r"lm_head/bias", "unknown", "bias"),
]

REFERENCES["bart"] = [
    dense(
        rf"model/(encoder|decoder)/layers/{N}/((self_attn|encoder_attn)/(q|k|v|out)_proj|fc1|fc2)"
    ),
    flax_norm(
        r"model/(encoder|decoder)/(layernorm_embedding"
        rf"|layers/{N}/(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm))"
    ),
    Array(r"model/shared/embedding", "embedding", "embedding"),
    # `embed_positions = nn.Embed(max_position_embeddings + offset, ...)`.
    Array(r"model/(encoder|decoder)/embed_positions/embedding", "embedding", "position"),
    # `self.param("final_logits_bias", ...)`, added to the tied LM head's logits.
    Array(r"final_logits_bias", "unknown", "bias"),
]

_VIT_LAYER = (
    r"attention/attention/(query|key|value)|attention/output/dense|intermediate/dense|output/dense"
)
REFERENCES["vit"] = [
    dense(rf"vit/encoder/layer/{N}/({_VIT_LAYER})|classifier"),
    flax_norm(rf"vit/(layernorm|encoder/layer/{N}/layernorm_(before|after))"),
    flax_conv(r"vit/embeddings/patch_embeddings/projection"),
    # FlaxViTEmbeddings: `self.param("cls_token", ...)`, `self.param("position_embeddings")`.
    Array(r"vit/embeddings/cls_token", "unknown", "token"),
    Array(r"vit/embeddings/position_embeddings", "unknown", "position"),
]

REFERENCES["beit"] = [
    dense(rf"beit/encoder/layer/{N}/({_VIT_LAYER})|classifier"),
    flax_norm(rf"beit/(pooler/layernorm|encoder/layer/{N}/layernorm_(before|after))"),
    flax_conv(r"beit/embeddings/patch_embeddings/projection"),
    Array(r"beit/embeddings/cls_token", "unknown", "token"),
    Array(r"beit/embeddings/position_embeddings", "unknown", "position"),
    # FlaxBeitRelativePositionBias: a learned table of biases indexed by relative position.
    Array(
        rf"beit/encoder/layer/{N}/attention/attention/relative_position_bias/"
        r"relative_position_bias_table",
        "unknown",
        "position",
    ),
    # FlaxBeitLayer: LayerScale, `lambda_1 * attention_output`.
    Array(rf"beit/encoder/layer/{N}/lambda_[12]", "unknown", "gain"),
]

REFERENCES["clip"] = [
    dense(
        rf"(text|vision)_model/encoder/layers/{N}/(self_attn/(q|k|v|out)_proj|mlp/fc[12])"
        r"|text_projection|visual_projection"
    ),
    flax_norm(
        rf"(text|vision)_model/encoder/layers/{N}/layer_norm[12]|text_model/final_layer_norm"
        r"|vision_model/(pre_layrnorm|post_layernorm)"
    ),
    flax_conv(r"vision_model/embeddings/patch_embedding"),
    Array(r"text_model/embeddings/token_embedding/embedding", "embedding", "embedding"),
    Array(r"(text|vision)_model/embeddings/position_embedding/embedding", "embedding", "position"),
    # FlaxCLIPVisionEmbeddings: `class_embedding`, concatenated before the patches.
    Array(r"vision_model/embeddings/class_embedding", "unknown", "token"),
    # FlaxCLIPModule: `logit_scale.exp()` multiplies the similarity logits (a temperature).
    Array(r"logit_scale", "unknown", "gain"),
]

REFERENCES["wav2vec2"] = [
    flax_conv(rf"wav2vec2/feature_extractor/conv_layers/{N}/conv"),
    flax_norm(
        rf"wav2vec2/feature_extractor/conv_layers/{N}/layer_norm|wav2vec2/feature_projection/"
        rf"layer_norm|wav2vec2/encoder/layer_norm|wav2vec2/encoder/layers/{N}/"
        r"(layer_norm|final_layer_norm)"
    ),
    dense(
        rf"wav2vec2/feature_projection/projection|wav2vec2/encoder/layers/{N}/"
        r"(attention/(q|k|v|out)_proj|feed_forward/(intermediate|output)_dense)|lm_head"
    ),
    # FlaxConvWithWeightNorm: kernel = weight_v / norm(weight_v, axes (0, 1)) * weight_g,
    # transposed into the nn.Conv it applies: weight_v is (out, in / groups, window).
    Layer(
        r"wav2vec2/encoder/pos_conv_embed/conv",
        "conv",
        {"weight_v": "weight", "weight_g": "gain", "bias": "bias"},
        OUT_IN_WINDOW,
    ),
    # FlaxWav2Vec2Module: the learned vector written over masked time steps.
    Array(r"wav2vec2/masked_spec_embed", "unknown", "token"),
]

REFERENCES["llama"] = [
    dense(rf"model/layers/{N}/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)|lm_head"),
    # FlaxLlamaRMSNorm: `self.weight = self.param("weight", ...)` scales the normalised x.
    Layer(
        rf"model/(norm|layers/{N}/(input_layernorm|post_attention_layernorm))",
        "rms_norm",
        {"weight": "scale"},
    ),
    Array(r"model/embed_tokens/embedding", "embedding", "embedding"),
]

REFERENCES["resnet"] = [
    flax_conv(
        rf"resnet/embedder/embedder/convolution|resnet/encoder/stages/{N}/layers/{N}/"
        rf"(layer/{N}|shortcut)/convolution"
    ),
    flax_norm(
        rf"resnet/embedder/embedder/normalization|resnet/encoder/stages/{N}/layers/{N}/"
        rf"(layer/{N}|shortcut)/normalization",
        "batch_norm",
    ),
    # FlaxResNetClassifierCollection: `nn.Dense(num_labels, name="1")`.
    dense(r"classifier/1"),
]

_DINOV2_LAYER = (
    r"attention/attention/(query|key|value)|attention/output/dense|mlp/weights_(in|out)"
)
REFERENCES["dinov2"] = [
    # FlaxDinov2SwiGLUFFN: `weights_in` (both gates at once) and `weights_out`, nn.Dense.
    dense(rf"dinov2/encoder/layer/{N}/({_DINOV2_LAYER})|classifier"),
    flax_norm(rf"dinov2/(layernorm|encoder/layer/{N}/norm[12])"),
    flax_conv(r"dinov2/embeddings/patch_embeddings/projection"),
    # FlaxDinov2Embeddings: `cls_token` concatenated before the patches, `mask_token`
    # written over masked patches, `position_embeddings` added (interpolated to the grid).
    Array(r"dinov2/embeddings/(cls|mask)_token", "unknown", "token"),
    Array(r"dinov2/embeddings/position_embeddings", "unknown", "position"),
    # FlaxDinov2LayerScale: `self.lambda1 * hidden_states` after each residual branch.
    Array(rf"dinov2/encoder/layer/{N}/layer_scale[12]/lambda1", "unknown", "gain"),
]

REFERENCES["bert_decoder"] = [
    # FlaxBertLayer with add_cross_attention: `crossattention = FlaxBertAttention(...)`,
    # the same layers as its self-attention; FlaxBertForCausalLM has no pooler.
    dense(
        rf"bert/encoder/layer/{N}/({_BERT_LAYER}|crossattention/self/(query|key|value)"
        r"|crossattention/output/dense)|cls/predictions/transform/dense"
    ),
    flax_norm(r".*/LayerNorm"),
    Array(r"bert/embeddings/(word|token_type)_embeddings/embedding", "embedding", "embedding"),
    Array(r"bert/embeddings/position_embeddings/embedding", "embedding", "position"),
    Array(r"cls/predictions/bias", "unknown", "bias"),
]

REFERENCES["bert2gpt2"] = [
    # FlaxEncoderDecoderModule: a FlaxBertModule encoder (with its pooler), a
    # FlaxGPT2LMHeadModule decoder (tied LM head), `enc_to_dec_proj = nn.Dense(...)`.
    dense(rf"encoder/encoder/layer/{N}/({_BERT_LAYER})|encoder/pooler/dense|enc_to_dec_proj"),
    # FlaxGPT2Attention(is_cross_attention=True): `c_attn` (keys and values) and `q_attn`,
    # FlaxConv1D stored (out, in) as in self-attention.
    dense(
        rf"decoder/transformer/h/{N}/((attn|crossattention)/(c_attn|c_proj)"
        r"|crossattention/q_attn|mlp/c_fc|mlp/c_proj)",
        OUT_IN,
    ),
    flax_norm(r"encoder/.*/LayerNorm"),
    flax_norm(rf"decoder/transformer/(h/{N}/(ln_[12]|ln_cross_attn)|ln_f)"),
    Array(r"encoder/embeddings/(word|token_type)_embeddings/embedding", "embedding", "embedding"),
    Array(r"encoder/embeddings/position_embeddings/embedding", "embedding", "position"),
    Array(r"decoder/transformer/wte/embedding", "embedding", "embedding"),
    Array(r"decoder/transformer/wpe/embedding", "embedding", "position"),
]

# The attention layers (transformers' `Flax*Attention` modules) by module path: every
# array at or under one is `within="attention"`, whatever the module's key is.
ATTENTION: dict[str, str] = {
    "gpt2": rf"transformer/h/{N}/attn",
    "bert": rf"bert/encoder/layer/{N}/attention",
    "roberta_prelayernorm": rf"roberta_prelayernorm/encoder/layer/{N}/attention",
    "bart": rf"model/(encoder|decoder)/layers/{N}/(self_attn|encoder_attn)",
    "vit": rf"vit/encoder/layer/{N}/attention",
    "beit": rf"beit/encoder/layer/{N}/attention",
    "clip": rf"(text|vision)_model/encoder/layers/{N}/self_attn",
    "wav2vec2": rf"wav2vec2/encoder/layers/{N}/attention",
    "llama": rf"model/layers/{N}/self_attn",
    "resnet": r"(?!)",  # none
    "dinov2": rf"dinov2/encoder/layer/{N}/attention",
    "bert_decoder": rf"bert/encoder/layer/{N}/(attention|crossattention)",
    "bert2gpt2": rf"encoder/encoder/layer/{N}/attention|decoder/transformer/h/{N}/(attn|crossattention)",
}


def within_attention(name: str, tree: Any) -> dict[str, bool]:
    """Per float leaf: whether an attention layer of ``ATTENTION`` holds it."""
    pattern = re.compile(ATTENTION[name])
    out = {}
    for path, x in array_leaves(tree).items():
        keys = path.split("/")[:-1]
        inside = any(pattern.fullmatch("/".join(keys[:i])) for i in range(1, len(keys) + 1))
        out[path] = bool(is_float(x) and inside)
    return out


# --- equimo 1.1.0, Equinox ----------------------------------------------------------------

B = rf"blocks/{N}/blocks/{N}"  # equimo's BlockChunk: stage, then block

REFERENCES["equimo_vit"] = [
    eqx_conv(r"patch_embed/proj"),
    # LearnedPosEmbed.weight: added to the patch tokens (resampled to the grid).
    Array(r"global_pos_embed/weight", "unknown", "position"),
    Array(r"cls_token|reg_tokens|mask_token", "unknown", "token"),
    eqx_norm(rf"{B}/(prenorm|norm)|norm"),
    # LayerScale.gamma: `x * gamma`.
    Array(rf"{B}/ls[12]/gamma", "unknown", "gain"),
    eqx_linear(rf"{B}/(attn/(qkv|proj)|mlp/fc[12])|head"),
]

REFERENCES["equimo_convnext"] = [
    eqx_conv(rf"{B}/(dwconv|pwconv[12])|blocks/{N}/downsample/conv"),
    # ConvNeXtBlock's norm and the downsamplers' LayerNorm2d normalise over channels.
    eqx_norm(rf"{B}/norm|blocks/{N}/downsample/norm|norm"),
    Array(rf"{B}/ls/gamma", "unknown", "gain"),
    eqx_linear(r"head"),
]

REFERENCES["equimo_vssd"] = [
    eqx_conv(
        r"patch_embed/conv1/conv|patch_embed/conv[23]/layers/\d+/conv"
        rf"|{B}/(cpe[12]|attn/conv)|blocks/{N}/downsample/conv[123]/conv"
    ),
    eqx_norm(r"patch_embed/conv1/norm|patch_embed/conv[23]/layers/\d+/norm", "group_norm"),
    eqx_norm(rf"{B}/(norm[12]|attn/norm)|norm"),
    eqx_linear(rf"{B}/(attn/(in_proj|out_proj|qkv|proj)|mlp/fc[12])|head"),
    # Mamba2Mixer: `softplus(dt + dt_bias)`; `A = -exp(A_log)`; `y + x * D` (the skip gain).
    Array(rf"{B}/attn/dt_bias", "unknown", "bias"),
    Array(rf"{B}/attn/A_log", "unknown", "gain"),
    Array(rf"{B}/attn/D", "unknown", "gain"),
]

REFERENCES["equimo_fastervit"] = [
    eqx_conv(
        r"patch_embed/conv[12]|blocks/\d+/downsample/downsampler/layers/\d+"
        rf"|{B}/conv[12]/conv|blocks/{N}/global_tokenizer/pos_embed"
    ),
    eqx_norm(r"patch_embed/norm[12]"),
    eqx_norm(rf"{B}/conv[12]/norm", "group_norm"),
    eqx_norm(rf"{B}/(hat_)?norm[12]|norm"),
    Array(rf"{B}/(ls[12]|hat_ls[123])/gamma", "unknown", "gain"),
    eqx_linear(
        rf"{B}/(hat_)?(attn/(qkv|proj)|mlp/fc[12])"
        rf"|{B}/((hat_)?attn/pos_emb_funct|(hat_)?pos_embed)/cpb_mlp/layers/{N}|head"
    ),
    # PosEmbMLPSwinv1D/2D: coordinate and index tables read through stop_gradient.
    Array(
        rf"{B}/((hat_)?attn/pos_emb_funct|(hat_)?pos_embed)/"
        r"(relative_coords_table|relative_position_index)",
        "unknown",
        "buffer",
    ),
]

REFERENCES["equimo_mobilenet"] = [
    eqx_conv(
        rf"conv1/conv|layers/{N}/(inverted_conv|depth_conv|point_conv)/conv"
        rf"|layers/{N}/se_conv/fc[12]"
    ),
    eqx_norm(rf"conv1/norm|layers/{N}/(inverted_conv|depth_conv|point_conv)/norm", "group_norm"),
    eqx_linear(r"classifier"),
]


# --- leaves and labels ----------------------------------------------------------------------


def _key_text(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_text(path: tuple) -> str:
    return "/".join(_key_text(k) for k in path)


def is_array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def array_leaves(tree: Any) -> dict[str, Any]:
    """The tree's arrays by canonical path, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_text(p): x for p, x in flat if is_array_leaf(x)}


class ReferenceError(AssertionError):
    """A reference that does not cover its model exactly."""


def labels(name: str, tree: Any) -> dict[str, Label]:
    """Every array leaf's label; raises if a leaf is covered by no rule or by two."""
    rules = REFERENCES[name]
    leaves = array_leaves(tree)
    out: dict[str, Label] = {}
    problems = []
    used = [False] * len(rules)
    for path in leaves:
        found = [(i, lab) for i, r in enumerate(rules) if (lab := r.match(path)) is not None]
        if not found:
            problems.append(f"{path}: no reference rule covers it")
        elif len(found) > 1:
            problems.append(f"{path}: covered by rules {[rules[i] for i, _ in found]}")
        else:
            used[found[0][0]] = True
            out[path] = found[0][1]
    problems += [f"rule covers no leaf: {r}" for r, u in zip(rules, used) if not u]
    if problems:
        raise ReferenceError(
            f"reference for {name} does not fit the model:\n" + "\n".join(problems)
        )
    return out


def is_float(x: Any) -> bool:
    return np.issubdtype(np.dtype(x.dtype), np.floating)


# --- preset oracles: the presets' documented meaning, on the reference labels --------------


def oracle_standard(lab: Label) -> bool:
    """No decay for biases, norms, embeddings, positions, tokens, gains, buffers."""
    return not (
        lab.role in NEVER_DECAYED | {"bias", "embedding"}
        or lab.kind in NORMS
        or lab.kind == "embedding"
    )


def oracle_everything_but_bias_and_norm(lab: Label) -> bool:
    """As standard, but embedding tables decay."""
    return not (lab.role in NEVER_DECAYED | {"bias"} or lab.kind in NORMS)


def oracle_gpt(lab: Label) -> bool:
    """Linear weights and embedding tables, nothing else."""
    return (lab.kind == "linear" and lab.role == "weight") or (
        lab.kind == "embedding" and lab.role == "embedding"
    )


def oracle_muon(lab: Label) -> bool:
    """Linear and convolution weights."""
    return lab.kind in ("linear", "conv") and lab.role == "weight"


ORACLES: dict[str, Callable[[Label], bool]] = {
    "standard": oracle_standard,
    "everything_but_bias_and_norm": oracle_everything_but_bias_and_norm,
    "gpt": oracle_gpt,
    "muon": oracle_muon,
}


def expected_mask(name: str, tree: Any, preset: str) -> dict[str, bool]:
    leaves = array_leaves(tree)
    labs = labels(name, tree)
    oracle = ORACLES[preset]
    return {p: bool(is_float(leaves[p]) and oracle(labs[p])) for p in leaves}
