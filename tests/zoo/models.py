"""Third-party models for the zoo suite, built abstractly from tiny configs.

transformers' Flax models: the Linen module of the model class (``_do_init=False``, so
nothing is allocated), its ``params`` collection from ``jax.eval_shape(module.init)``,
and the example inputs that init took, so a traced mask can trace the same call.
equimo's models: ``eqx.filter_eval_shape`` of the constructor.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Built:
    """One model, ready for decaymask: the tree and, for Linen, what traces it."""

    name: str
    framework: str  # "linen" or "equinox"
    tree: Any  # Linen: the params collection; Equinox: the abstract model
    module: Any = None
    args: tuple = ()
    kwargs: Any = None


def _linen(name: str, model_cls: Callable, config: Any, args: tuple, kwargs: dict) -> Built:
    # transformers' own code broadcasts ranks freely (a bias added to a 3-D activation).
    with jax.numpy_rank_promotion("allow"):
        model = model_cls(config, _do_init=False)  # traces init abstractly, allocates nothing
    return _linen_module(name, model.module, args, kwargs)


def _linen_module(name: str, module: Any, args: tuple, kwargs: dict) -> Built:
    """A Linen module of a model class that cannot skip init (``FlaxEncoderDecoderModel``
    refuses ``_do_init=False``): its ``module_class`` built from the config directly."""
    with jax.numpy_rank_promotion("allow"):
        variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return Built(name, "linen", dict(variables["params"]), module, args, kwargs)


def _ids(batch: int = 1, length: int = 8) -> jax.Array:
    return jnp.zeros((batch, length), dtype=jnp.int32)


def gpt2() -> Built:
    from transformers import GPT2Config, FlaxGPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    ids = _ids()
    return _linen("gpt2", FlaxGPT2LMHeadModel, config, (ids, jnp.ones_like(ids)),
                  {"position_ids": jnp.arange(8)[None]})


def bert() -> Built:
    from transformers import BertConfig, FlaxBertForPreTraining

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)
    ids = _ids()
    return _linen("bert", FlaxBertForPreTraining, config,
                  (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(8)[None],
                   jnp.ones((2, 2))), {})


def roberta_prelayernorm() -> Built:
    from transformers import FlaxRobertaPreLayerNormForMaskedLM, RobertaPreLayerNormConfig

    config = RobertaPreLayerNormConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=20)
    ids = _ids()
    return _linen("roberta_prelayernorm", FlaxRobertaPreLayerNormForMaskedLM, config,
                  (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(2, 10)[None],
                   jnp.ones((2, 2))), {})


def bart() -> Built:
    from transformers import BartConfig, FlaxBartForConditionalGeneration

    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16)
    ids = _ids()
    pos = jnp.arange(8)[None]
    return _linen("bart", FlaxBartForConditionalGeneration, config,
                  (ids, jnp.ones_like(ids), ids, jnp.ones_like(ids), pos, pos), {})


def vit() -> Built:
    from transformers import FlaxViTForImageClassification, ViTConfig

    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, image_size=8, patch_size=4, num_labels=3)
    return _linen("vit", FlaxViTForImageClassification, config,
                  (jnp.zeros((1, 8, 8, 3)),), {})


def beit() -> Built:
    from transformers import BeitConfig, FlaxBeitForImageClassification

    config = BeitConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, image_size=8,
                        patch_size=4, num_labels=3, use_relative_position_bias=True,
                        use_shared_relative_position_bias=False,
                        use_absolute_position_embeddings=True, layer_scale_init_value=0.1,
                        use_mean_pooling=True)
    return _linen("beit", FlaxBeitForImageClassification, config,
                  (jnp.zeros((1, 8, 8, 3)),), {})


def clip() -> Built:
    from transformers import CLIPConfig, FlaxCLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4),
        projection_dim=8,
    )
    ids = _ids()
    return _linen("clip", FlaxCLIPModel, config,
                  (ids, jnp.zeros((1, 8, 8, 3)), jnp.ones_like(ids), jnp.arange(8)[None]), {})


def wav2vec2() -> Built:
    from transformers import FlaxWav2Vec2ForCTC, Wav2Vec2Config

    config = Wav2Vec2Config(vocab_size=12, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                            do_stable_layer_norm=True, feat_extract_norm="layer")
    audio = jnp.zeros((1, 400))
    mask = jnp.ones((1, 400), jnp.int32)
    return _linen("wav2vec2", FlaxWav2Vec2ForCTC, config, (audio, mask), {})


def llama() -> Built:
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=16)
    ids = _ids()
    return _linen("llama", FlaxLlamaForCausalLM, config,
                  (ids, jnp.ones_like(ids), jnp.arange(8)[None]), {})


def resnet() -> Built:
    from transformers import FlaxResNetForImageClassification, ResNetConfig

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="bottleneck", num_labels=3)
    return _linen("resnet", FlaxResNetForImageClassification, config,
                  (jnp.zeros((1, 32, 32, 3)),), {})


def dinov2() -> Built:
    """DINOv2 with its SwiGLU feed-forward (the giant checkpoints' ``weights_in`` and
    ``weights_out``) and a layer scale after each branch (``layer_scale1/lambda1``)."""
    from transformers import Dinov2Config, FlaxDinov2ForImageClassification

    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          mlp_ratio=2, image_size=8, patch_size=4, num_labels=3,
                          use_swiglu_ffn=True)
    return _linen("dinov2", FlaxDinov2ForImageClassification, config,
                  (jnp.zeros((1, 8, 8, 3)),), {})


def bert_decoder() -> Built:
    """BERT as a decoder attending to an encoder's states (``add_cross_attention``):
    every layer has a ``crossattention``, the compound transformers writes glued."""
    from transformers import BertConfig, FlaxBertForCausalLM

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, is_decoder=True,
                        add_cross_attention=True)
    ids = _ids()
    return _linen("bert_decoder", FlaxBertForCausalLM, config,
                  (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(8)[None], None,
                   jnp.zeros((1, 8, 16)), jnp.ones_like(ids)), {})


def bert2gpt2() -> Built:
    """``FlaxEncoderDecoderModel``: a BERT encoder and a GPT-2 decoder with cross-attention
    (``crossattention`` with ``q_attn``, and ``ln_cross_attn``), joined by
    ``enc_to_dec_proj`` where their widths differ."""
    from transformers import (BertConfig, EncoderDecoderConfig, FlaxEncoderDecoderModel,
                              GPT2Config)

    encoder = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=16)
    decoder = GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                         is_decoder=True, add_cross_attention=True)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    ids = _ids()
    pos = jnp.arange(8)[None]
    module = FlaxEncoderDecoderModel.module_class(config)
    return _linen_module("bert2gpt2", module,
                         (ids, jnp.ones_like(ids), ids, jnp.ones_like(ids), pos, pos), {})


TRANSFORMERS: dict[str, Callable[[], Built]] = {
    f.__name__: f
    for f in (gpt2, bert, roberta_prelayernorm, bart, vit, beit, clip, wav2vec2, llama, resnet,
              dinov2, bert_decoder, bert2gpt2)
}


@functools.cache
def build(name: str) -> Built:
    return MODELS[name]()


MODELS: dict[str, Callable[[], Built]] = {**TRANSFORMERS}


def _equinox(name: str, make: Callable[[jax.Array], Any]) -> Built:
    import equinox as eqx

    with jax.numpy_rank_promotion("allow"):
        model = eqx.filter_eval_shape(make, jax.random.key(0))
    return Built(name, "equinox", model)


def equimo_vit() -> Built:
    from equimo.models import VisionTransformer

    return _equinox("equimo_vit", lambda key: VisionTransformer(
        img_size=16, in_channels=3, dim=16, patch_size=4, num_heads=2, depths=[2],
        reg_tokens=4, init_values=1e-5, use_mask_token=True, num_classes=3, key=key))


def equimo_convnext() -> Built:
    from equimo.models import ConvNeXt

    return _equinox("equimo_convnext", lambda key: ConvNeXt(
        3, depths=[1, 1, 1, 1], dims=[8, 16, 16, 16], num_classes=3, key=key))


def equimo_vssd() -> Built:
    from equimo.models import Vssd

    return _equinox("equimo_vssd", lambda key: Vssd(
        img_size=32, in_channels=3, dim=8, d_state=8, depths=[1, 1], num_heads=[2, 2],
        attentions_layers=("mamba2mixer", "attention"), num_classes=3, key=key))


def equimo_fastervit() -> Built:
    from equimo.models import FasterViT

    return _equinox("equimo_fastervit", lambda key: FasterViT(
        img_size=64, in_channels=3, dim=8, in_dim=8, num_heads=2,
        hat=[False, False, True], depths=[1, 1, 1], window_size=[2, 2, 2], ct_size=1,
        init_values=1e-5, num_classes=3, key=key))


def equimo_mobilenet() -> Built:
    from equimo.models import MobileNetv3

    return _equinox("equimo_mobilenet", lambda key: MobileNetv3(
        3, [(8, 8, 3, 2, True, "relu"), (8, 16, 3, 1, False, "hard_swish")],
        last_channels=16, num_classes=3, key=key))


EQUIMO: dict[str, Callable[[], Built]] = {
    f.__name__: f
    for f in (equimo_vit, equimo_convnext, equimo_vssd, equimo_fastervit, equimo_mobilenet)
}
if sys.version_info >= (3, 11):  # equimo 1.1.0 needs Python 3.11; so does its extra
    MODELS.update(EQUIMO)


# Builders for the parameter-group tests (tests/zoo/test_zoo_groups.py); not in MODELS,
# whose every model has a weight-decay reference.


def bert_classifier() -> Built:
    """BERT with its sequence-classification head (``bert/pooler``, ``classifier``)."""
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, num_labels=3)
    ids = _ids()
    return _linen("bert_classifier", FlaxBertForSequenceClassification, config,
                  (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(8)[None],
                   jnp.ones((2, 2))), {})


def beit_shared_bias() -> Built:
    """BEiT configured as its self-supervised checkpoints (``pt22k``): one relative
    position bias shared by every layer (``beit/encoder/relative_position_bias``), no
    absolute position embeddings."""
    from transformers import BeitConfig, FlaxBeitForImageClassification

    config = BeitConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, image_size=8,
                        patch_size=4, num_labels=3, use_relative_position_bias=False,
                        use_shared_relative_position_bias=True,
                        use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
                        use_mean_pooling=True)
    return _linen("beit_shared_bias", FlaxBeitForImageClassification, config,
                  (jnp.zeros((1, 8, 8, 3)),), {})


def equimo_vit_chunked(depths: tuple[int, ...] = (2, 2)) -> Built:
    """equimo's ViT with its blocks in chunks (``depths=[2, 2]``): ``blocks/<chunk>/
    blocks/<i>``, i counted from 0 in each chunk."""
    from equimo.models import VisionTransformer

    name = "equimo_vit_chunked_" + "_".join(map(str, depths))
    return _equinox(name, lambda key: VisionTransformer(
        img_size=16, in_channels=3, dim=16, patch_size=4, num_heads=2, depths=list(depths),
        reg_tokens=4, init_values=1e-5, use_mask_token=True, num_classes=3, key=key))
