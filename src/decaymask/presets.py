"""Ready-made policies, written in the framework-neutral vocabulary.

Each preset says what it decays in terms of layer kinds and parameter roles, so it means
the same in Equinox, Flax Linen and Flax NNX. Where the training code it follows used a
rule on names or ``ndim``, the preset keeps the intent and drops the accident; each
docstring says where that makes a difference.
"""

from __future__ import annotations

from typing import Any

from ._face import Policy
from .core._ladder import BlockSelector, layer_decay
from .core._group_rules import lr
from .core._rules import decay, no_decay
from .core._selectors import PathSelector
from .core._vocab import Role


# Arrays no recipe decays, whatever the layer: learned position tables and tokens
# (timm's ``no_weight_decay()`` lists ``pos_embed``, ``cls_token``, ``reg_token``;
# DINOv2 and MAE likewise), gains (LayerScale ``gamma``, weight-norm ``g``; timm's
# ``ndim <= 1`` rule spares them), and buffers, which decay would shrink every step
# even with zero gradients (Mamba marks ``A_log`` and ``D`` ``_no_weight_decay``: gains
# here).
_NEVER: tuple[Role, ...] = ("position", "token", "gain", "buffer")


def standard() -> Policy:
    """Decays every parameter except biases, norm parameters, embeddings, position
    tables, learned tokens, gains and buffers.

    The most common recipe in fine-tuning code: Hugging Face ``transformers``' Trainer
    excludes biases and layer-norm weights, and minGPT (Karpathy) additionally keeps
    embeddings out of decay. This preset is minGPT's choice over every layer kind:
    biases of every layer, every parameter of every norm (scales and biases) and
    embedding tables are not decayed, nor are position tables, learned tokens, gains
    and buffers (timm's ``no_weight_decay()``, DINOv2, MAE). Everything else decays:
    weights of every layer, and arrays whose role stays ``other`` (PReLU slopes, LoRA
    factors, arrays of layers decaymask does not know, for which it warns), because a
    parameter nobody named is most often a weight.

    Example:
      >>> import decaymask as dm
      >>> dm.presets.standard()
      Policy(
          decay(),
          no_decay(param=('bias', 'scale', 'embedding', 'position', 'token', 'gain', 'buffer')),
          no_decay(layer='norm'),
          no_decay(layer='embedding'),
      )
    """
    return Policy(
        decay(),
        no_decay(param=("bias", "scale", "embedding", *_NEVER)),
        no_decay(layer="norm"),
        no_decay(layer="embedding"),
    )


def everything_but_bias_and_norm() -> Policy:
    """Decays every parameter except biases and norm parameters (and position tables,
    learned tokens, gains and buffers); embedding tables decay.

    Hugging Face ``transformers``' Trainer (``get_decay_parameter_names``: no decay for
    ``bias`` and the weights of layer-norm layers) and timm's
    ``param_groups_weight_decay`` (no decay for biases and 1-D parameters, nor for the
    model's ``no_weight_decay()`` names: position embeddings and tokens) both give this
    on ordinary models. timm's ``ndim <= 1`` rule is replaced by roles: a stacked
    (scanned) norm scale is 2-D and timm would decay it, and a 1-D parameter that is
    none of the roles above (PReLU slopes, say) would be spared; here the first is
    spared and the second decays.

    Example:
      >>> import decaymask as dm
      >>> dm.presets.everything_but_bias_and_norm()
      Policy(
          decay(),
          no_decay(param=('bias', 'scale', 'position', 'token', 'gain', 'buffer')),
          no_decay(layer='norm'),
      )
    """
    return Policy(
        decay(),
        no_decay(param=("bias", "scale", *_NEVER)),
        no_decay(layer="norm"),
    )


def gpt() -> Policy:
    """Decays the weight matrices of linear layers and the embedding tables, nothing else.

    nanoGPT (Karpathy, ``configure_optimizers``) decays every parameter with two or more
    axes: in a GPT those are the linear weights (attention projections included) and
    the token and position embeddings. This preset says so by kind and role, so that it
    still means that where ``ndim`` would not: convolution kernels and stacked
    (scanned) norm scales and biases have two or more axes, and nanoGPT's rule would
    decay them; this preset does not. Learned position tables (GPT-2's ``wpe``) are not
    decayed, as in every other preset and in timm, DINOv2 and MAE: nanoGPT's decay of
    ``wpe`` follows from its ``ndim`` rule, not from a choice; add
    ``dm.decay(param="position")`` to restore it.

    Example:
      >>> import decaymask as dm
      >>> dm.presets.gpt()
      Policy(
          decay(layer='linear', param='weight'),
          decay(layer='embedding', param='embedding'),
      )
    """
    return Policy(
        decay(layer="linear", param="weight"),
        decay(layer="embedding", param="embedding"),
    )


def muon(*, exclude: Any = None) -> Policy:
    """Selects the weight matrices for Muon: linear, convolution and attention weights.

    For ``policy.muon_dims_for_equinox`` / ``muon_dims_for_flax``: the selected leaves go
    to Muon with their layout's reduction and output axes, the rest (embeddings,
    biases, norm scales, everything else) to Adam. This follows Keller Jordan's Muon
    for modded-nanogpt and Moonshot's Moonlight, which orthogonalise the hidden weight
    matrices and leave embeddings, the output head, and all vectors to AdamW; optax's
    own default instead sends every 2-D array to Muon and nothing else, which selects
    embedding tables, misses 3-D attention and 4-D convolution kernels, and reads
    Equinox's ``(out, in)`` weights backwards. Convolution kernels are included (their
    input channels and kernel window form the reduction axes), as in Muon's
    convolutional experiments.

    Args:
      exclude: path globs (or compiled patterns) of weights to leave to Adam, most
        often the output head: ``muon(exclude="lm_head/*")``.

    Example:
      >>> import decaymask as dm
      >>> dm.presets.muon(exclude="head/*")
      Policy(
          decay(layer=('linear', 'conv'), param='weight'),
          no_decay(path='head/*'),
      )
    """
    rules = [decay(layer=("linear", "conv"), param="weight")]
    if exclude is not None:
        rules.append(no_decay(path=exclude))
    return Policy(*rules)


def vit_finetune(rate: float = 0.65, *, blocks: BlockSelector | None = None) -> Policy:
    """Fine-tuning a ViT as MAE and BEiT do: layer-wise learning-rate decay, and no
    decay for biases, norms, position embeddings and tokens.

    MAE (He et al., ``util/lr_decay.py``: ``param_groups_lrd`` and
    ``get_layer_id_for_vit``) and BEiT (Bao et al., ``optim_factory.py``:
    ``get_parameter_groups`` and ``get_num_layer_for_vit``) give ``cls_token``,
    ``pos_embed`` and ``patch_embed`` layer id 0, block ``i`` id ``i + 1`` and the rest
    (the final norm, the head) ``n + 1``, and scale each group's learning rate by
    ``rate ** (n + 1 - id)``; both keep 1-D parameters (biases, norm scales) and the
    position embedding and tokens out of weight decay. Their papers fine-tune ViT-B
    with ``rate=0.65`` and ViT-L/H with ``0.75``. Here the ids come from
    :func:`decaymask.layer_decay` and the decay from roles, so a scanned model gets
    the same multipliers per layer as an unrolled one.

    Args:
      rate: the layer decay, in (0, 1].
      blocks: the blocks, where the model has more than one candidate stack (see
        :func:`decaymask.layer_decay`).

    Example:
      >>> import decaymask as dm
      >>> dm.presets.vit_finetune(0.75)
      Policy(
          decay(),
          no_decay(param=('bias', 'scale', 'position', 'token', 'gain', 'buffer')),
          no_decay(layer='norm'),
          layer_decay(0.75),
      )
    """
    return Policy(
        *everything_but_bias_and_norm().rules,
        layer_decay(rate, blocks=blocks),
    )


def dinov2(
    rate: float = 0.9,
    *,
    patch_embed_lr: float = 0.2,
    patch_embed: PathSelector = ("patch_embed/*", "*/patch_embed/*"),
    blocks: BlockSelector | None = None,
) -> Policy:
    """DINOv2's parameter groups: layer-wise decay 0.9, the patch embedding at 0.2 of
    its layer's learning rate, and no decay for biases, norms and LayerScale gains.

    DINOv2 (Oquab et al., ``dinov2/train/param_groups.py``:
    ``get_params_groups_with_decay`` and ``get_vit_lr_decay_rate``, with
    ``layerwise_decay: 0.9`` and ``patch_embed_lr_mult: 0.2`` in
    ``configs/ssl_default_config.yaml``) gives the tokens, the position embedding and
    the patch embedding layer id 0 and block ``i`` id ``i + 1``, multiplies the patch
    embedding's learning rate by ``patch_embed_lr_mult``, and sets the weight decay of
    every bias, norm and ``gamma`` (LayerScale) to 0. Here the last is said by roles,
    and the position embedding and tokens are not decayed either, as in every preset.

    Args:
      rate: the layer decay, in (0, 1].
      patch_embed_lr: the patch embedding's multiplier, on top of its layer's.
      patch_embed: path globs of the patch embedding's parameters.
      blocks: as in :func:`decaymask.layer_decay`.

    Example:
      >>> import decaymask as dm
      >>> dm.presets.dinov2()
      Policy(
          decay(),
          no_decay(param=('bias', 'scale', 'position', 'token', 'gain', 'buffer')),
          no_decay(layer='norm'),
          lr(0.2, path=('patch_embed/*', '*/patch_embed/*')),
          layer_decay(0.9),
      )
    """
    return Policy(
        *everything_but_bias_and_norm().rules,
        lr(patch_embed_lr, path=patch_embed),
        layer_decay(rate, blocks=blocks),
    )


__all__ = ["dinov2", "everything_but_bias_and_norm", "gpt", "muon", "standard", "vit_finetune"]
