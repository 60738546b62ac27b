"""The weight-decay masks the models' own training code builds, written as code.

Each recipe reads only what its original reads (key names, ``ndim``, a list of names), on
the same trees, so it checks the reference labels against an independent source. Where a
preset deliberately decides otherwise, ``DIFFERENCES`` says why; any other disagreement
between a recipe and the preset it corresponds to is an error in a reference.
"""

from __future__ import annotations

from typing import Any, Callable

from . import reference as ref
from .reference import Label


def transformers_flax_examples(tree: Any) -> dict[str, bool]:
    """``decay_mask_fn`` of transformers' Flax example scripts (run_mlm_flax.py and others).

    No decay for a key named exactly ``bias``, nor for any array whose last two keys are
    the last two keys of some array whose joined, lower-cased path contains
    ``layernorm``, ``layer_norm`` or ``ln``.
    """
    leaves = ref.array_leaves(tree)
    keys = {path: tuple(path.split("/")) for path in leaves}
    marked = {"layernorm", "layer_norm", "ln"}
    spared_pairs = {
        k[-2:] for k in keys.values() if any(word in "".join(k).lower() for word in marked)
    }
    return {path: k[-1] != "bias" and k[-2:] not in spared_pairs for path, k in keys.items()}


def dinov2_param_groups(tree: Any) -> dict[str, bool]:
    """DINOv2's ``get_params_groups_with_decay``: no decay for names ending in ``.bias``
    or containing ``norm`` or ``gamma`` (its LayerScale is ``ls1.gamma``); every other
    array decays, position embeddings and tokens included."""
    return {
        path: not (path.endswith("/bias") or "norm" in path or "gamma" in path)
        for path in ref.array_leaves(tree)
    }


def nanogpt(tree: Any) -> dict[str, bool]:
    """nanoGPT's ``configure_optimizers``: decay every parameter with two or more axes."""
    return {path: len(x.shape) >= 2 for path, x in ref.array_leaves(tree).items()}


def timm_param_groups(no_weight_decay: set[str], buffers: set[str] = frozenset()) -> Callable:
    """timm's ``param_groups_weight_decay``: no decay for ``ndim <= 1``, names ending in
    ``.bias`` and the model's ``no_weight_decay()`` names.

    ``no_weight_decay`` holds the model's list in equimo's paths (``cls_token``,
    ``global_pos_embed/weight`` for timm's ``pos_embed``), or final names (``A_log``)
    for Mamba's ``_no_weight_decay`` attributes. ``buffers`` are the last names of arrays
    the PyTorch original registers as buffers: the optimizer never sees them.
    """

    def recipe(tree: Any) -> dict[str, bool]:
        out = {}
        for path, x in ref.array_leaves(tree).items():
            name = path.rpartition("/")[2]
            listed = path in no_weight_decay or name in no_weight_decay
            out[path] = not (
                name in buffers or len(x.shape) <= 1 or name == "bias" or listed
            )
        return out

    return recipe


_SWIN_BUFFERS = {"relative_coords_table", "relative_position_index"}

# (model, recipe name) -> (recipe, the preset it corresponds to)
RECIPES: dict[tuple[str, str], tuple[Callable[[Any], dict[str, bool]], str]] = {}
for _name in ("gpt2", "bert", "roberta_prelayernorm", "bart", "vit", "beit", "clip",
              "wav2vec2", "llama", "resnet", "dinov2", "bert_decoder", "bert2gpt2"):
    RECIPES[(_name, "transformers_flax_examples")] = (
        transformers_flax_examples,
        "everything_but_bias_and_norm",
    )
RECIPES[("gpt2", "nanogpt")] = (nanogpt, "gpt")
RECIPES[("dinov2", "dinov2")] = (dinov2_param_groups, "everything_but_bias_and_norm")
RECIPES[("equimo_vit", "timm")] = (
    timm_param_groups({"cls_token", "global_pos_embed/weight"}),
    "everything_but_bias_and_norm",
)
RECIPES[("equimo_convnext", "timm")] = (timm_param_groups(set()), "everything_but_bias_and_norm")
RECIPES[("equimo_vssd", "timm_and_mamba")] = (
    timm_param_groups({"A_log", "D"}),
    "everything_but_bias_and_norm",
)
RECIPES[("equimo_fastervit", "timm")] = (
    timm_param_groups(set(), buffers=_SWIN_BUFFERS),
    "everything_but_bias_and_norm",
)
RECIPES[("equimo_mobilenet", "timm")] = (timm_param_groups(set()), "everything_but_bias_and_norm")


def _last(path: str) -> str:
    return path.rpartition("/")[2]


# Why a preset deliberately differs from a recipe: (reason, applies(label, path, recipe, preset)).
DIFFERENCES: list[tuple[str, Callable[[Label, str, bool, bool], bool]]] = [
    (
        "presets never decay positions, tokens, gains or buffers; the recipe decays them "
        "(2-D tokens timm's list misses, position tables, LayerScale, weight-norm gains)",
        lambda lab, path, recipe, preset: lab.role in ref.NEVER_DECAYED and recipe and not preset,
    ),
    (
        "a norm the recipe's substrings miss (BatchNorm `normalization`, RMSNorm `norm`, "
        "CLIP's `pre_layrnorm`): presets never decay norm parameters",
        lambda lab, path, recipe, preset: lab.kind in ref.NORMS and recipe and not preset,
    ),
    (
        "a bias not named exactly `bias` (`final_logits_bias`): presets read the role",
        lambda lab, path, recipe, preset: (
            lab.role == "bias" and _last(path) != "bias" and recipe and not preset
        ),
    ),
    (
        "the recipe's substring `layernorm` matches the root key `roberta_prelayernorm`, "
        "so the last two keys of every array under it (`dense/kernel`, "
        "`word_embeddings/embedding`) are spared wherever they occur, the LM head's included",
        lambda lab, path, recipe, preset: (
            lab.kind not in ref.NORMS and lab.role in ("weight", "embedding") and not recipe
            and preset
        ),
    ),

]
