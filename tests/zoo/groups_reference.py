"""Layer ids and trainable sets as the models' own fine-tuning recipes give them.

A reference has two parts, each read off code other than decaymask's:

- a rename from the model's paths to the names the recipe's code reads, taken from the
  converters that move checkpoints between the two: transformers'
  ``convert_vit_timm_to_pytorch.py`` and ``convert_beit_unilm_to_pytorch.py`` (their
  ``create_rename_keys``, read from right to left), timm's ``_load_weights`` for
  big_vision checkpoints, the ``layer_<i>`` scopes of TF BERT and ELECTRA checkpoints,
  DINOv2's chunked block names and DINOv3's ``storage_tokens`` for equimo;
- the recipe's rule on those names, written here as code from the original:
  MAE ``util/lr_decay.py`` ``get_layer_id_for_vit``, BEiT ``beit/optim_factory.py``
  ``get_num_layer_for_vit``, DINOv3 ``dinov3/train/param_groups.py``
  ``get_vit_lr_decay_rate``, ELECTRA ``model/optimization.py`` ``_get_layer_lrs``; for
  freezing, MAE's linear probe, MAE's partial fine-tuning, BitFit, MoCo v3's frozen patch
  projection and big_vision's ``config.schedule`` (``None`` freezes).

MAE, BEiT and DINOv3 scale a leaf of id ``k`` by ``rate ** (n + 1 - k)`` with ``n``
blocks (MAE: ``layer_decay ** (num_layers - i)`` with ``num_layers = len(blocks) + 1``;
BEiT: ``values[i] = layer_decay ** (num_layers + 1 - i)``; DINOv3 the same formula), so
only their ids differ. ELECTRA puts its head one step higher, see :func:`electra_depth`.

Every leaf of a model must be named by a rule of its rename (the first that matches), and
every rule must name some leaf: a leaf a new version adds, or a rule gone stale, is an
error here rather than a silent gap.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from .reference import ReferenceError, array_leaves

Id = Union[int, tuple[int, ...]]

# --- the recipes' rules, on the names they read ------------------------------------------


def mae_layer_id(name: str, num_layers: int) -> int:
    """MAE ``get_layer_id_for_vit``; MAE passes ``num_layers = len(model.blocks) + 1``."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def beit_layer_id(name: str, num_max_layer: int) -> int:
    """BEiT ``get_num_layer_for_vit``; BEiT's ``LayerDecayValueAssigner`` passes
    ``num_max_layer = len(values) = num_layers + 2``, so ``num_max_layer - 1`` is
    ``n + 1``: the head's id, which BEiT also gives the shared ``rel_pos_bias``."""
    if name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


_DINOV3_STEM = ("pos_embed", "patch_embed", "mask_token", "cls_token", "storage_tokens")


def dinov3_layer_id(name: str, num_layers: int, chunked_blocks: bool) -> int:
    """DINOv3 ``get_vit_lr_decay_rate``'s layer id, for a backbone (``n_blocks > 0``
    makes ``force_is_backbone`` true, so the dotted and undotted stem tests agree).
    DINOv2's rule is the same without ``storage_tokens``: it leaves DINOv2's
    ``register_tokens`` at ``num_layers + 1``, with the head."""
    layer_id = num_layers + 1
    if any(word in name for word in _DINOV3_STEM):
        layer_id = 0
    elif ".blocks." in name and ".residual." not in name:
        layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
    elif chunked_blocks and "blocks." in name and "residual." not in name:
        layer_id = int(name[name.find("blocks.") :].split(".")[2]) + 1
    elif "blocks." in name and "residual." not in name:
        layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return layer_id


def electra_depth(name: str, n_layers: int) -> int:
    """ELECTRA ``_get_layer_lrs``: the depth of the key found in the TF variable name
    (``apply_gradients`` tests ``key in var.name``; on BERT's names one key matches).

    ELECTRA gives ``task_specific/`` depth ``n_layers + 2`` and scales by ``rate **
    (n_layers + 2 - depth)``: one more factor of the rate below the head than BEiT and
    MAE (which MAE's ``lr_decay.py`` cites ELECTRA for). The head is put at ``n + 1``
    here, BEiT's and MAE's top and decaymask's documented one, so that the ids compare;
    a variable no key matches (BERT's pooler: ELECTRA's optimizer raises there) is
    neither the embeddings nor a layer, BEiT's ``else``: ``n + 1``.
    """
    key_to_depths = {"/embeddings/": 0, "/embeddings_project/": 0, "task_specific/": n_layers + 1}
    for layer in range(n_layers):
        key_to_depths[f"encoder/layer_{layer}/"] = layer + 1
    for key, depth in key_to_depths.items():
        if key in name:
            return depth
    return n_layers + 1


def recipe_scale(rate: float, blocks: int, layer_id: int) -> float:
    """``rate ** (n + 1 - id)``: MAE's ``layer_scales``, BEiT's ``values``, DINOv3's rate."""
    return rate ** (blocks + 1 - layer_id)


# --- renames: the model's paths to the recipe's names -------------------------------------

# transformers' PyTorch models keep the Flax module names; only the array's own key
# differs (modeling_flax_pytorch_utils.rename_key_and_reshape_tensor).
TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

Replacement = Union[str, Callable[["re.Match[str]"], str]]


@dataclasses.dataclass(frozen=True)
class Rename:
    """Model paths to the recipe's names: the first rule whose pattern matches the whole
    path gives the name. A replacement holding ``{layer}`` names a leaf stacked along
    its first axis: one name per layer."""

    source: str
    rules: tuple[tuple[str, Replacement], ...]
    sep: str = "."
    leaf_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def names(self, tree: Any) -> dict[str, str | tuple[str, ...]]:
        out: dict[str, str | tuple[str, ...]] = {}
        used = [False] * len(self.rules)
        problems = []
        for path, leaf in array_leaves(tree).items():
            for i, (pattern, replacement) in enumerate(self.rules):
                found = re.fullmatch(pattern, path)
                if found is None:
                    continue
                used[i] = True
                text = replacement(found) if callable(replacement) else found.expand(replacement)
                if "{layer}" in text:
                    out[path] = tuple(
                        self._finish(text.replace("{layer}", str(k))) for k in range(leaf.shape[0])
                    )
                else:
                    out[path] = self._finish(text)
                break
            else:
                problems.append(f"{path}: no rename rule covers it")
        problems += [
            f"rename rule covers no leaf: {rule[0]!r}" for rule, u in zip(self.rules, used) if not u
        ]
        if problems:
            raise ReferenceError(
                f"rename ({self.source}) does not fit the model:\n" + "\n".join(problems)
            )
        return out

    def _finish(self, text: str) -> str:
        head, _, last = text.rpartition("/")
        last = self.leaf_names.get(last, last)
        return (f"{head}/{last}" if head else last).replace("/", self.sep)


@dataclasses.dataclass(frozen=True)
class Ladder:
    """A layer-decay recipe on one model: every leaf's id, from the recipe's own rule."""

    recipe: str
    rename: Rename
    layer_id: Callable[[str, int], int]
    """(the recipe's name of a leaf, the number of blocks) -> its id."""
    blocks: int
    """The number of blocks, from the model's config."""

    def names(self, tree: Any) -> dict[str, str | tuple[str, ...]]:
        return self.rename.names(tree)

    def ids(self, tree: Any) -> dict[str, Id]:
        out: dict[str, Id] = {}
        for path, name in self.names(tree).items():
            if isinstance(name, tuple):
                out[path] = tuple(self.layer_id(n, self.blocks) for n in name)
            else:
                out[path] = self.layer_id(name, self.blocks)
        seen = {k for v in out.values() for k in (v if isinstance(v, tuple) else (v,))}
        if not seen <= set(range(self.blocks + 2)) or not set(range(1, self.blocks + 1)) <= seen:
            raise ReferenceError(
                f"{self.recipe}: ids {sorted(seen)} do not make a ladder of {self.blocks} "
                f"blocks (0, 1..{self.blocks}, {self.blocks + 1}): the block count or the "
                f"rename is wrong"
            )
        return out

    def scales(self, tree: Any, rate: float) -> dict[str, float | tuple[float, ...]]:
        def scale(i: Id) -> float | tuple[float, ...]:
            if isinstance(i, tuple):
                return tuple(recipe_scale(rate, self.blocks, k) for k in i)
            return recipe_scale(rate, self.blocks, i)

        return {path: scale(i) for path, i in self.ids(tree).items()}


@dataclasses.dataclass(frozen=True)
class Freezing:
    """A freezing recipe on one model: which leaves it trains (``requires_grad``)."""

    name: str
    recipe: str
    rename: Rename
    trains: Callable[[str, int], bool]
    """(the recipe's name of a leaf, the number of blocks) -> whether it is trained."""
    blocks: int

    def trainable(self, tree: Any) -> dict[str, bool]:
        out = {}
        for path, name in self.rename.names(tree).items():
            if isinstance(name, tuple):
                flags = {self.trains(n, self.blocks) for n in name}
                if len(flags) != 1:
                    raise ReferenceError(
                        f"{self.recipe} freezes some layers of the stacked leaf {path} and "
                        f"not others: no per-leaf rule can say that"
                    )
                out[path] = flags.pop()
            else:
                out[path] = self.trains(name, self.blocks)
        return out


# --- transformers 4.57.6, Flax ------------------------------------------------------------


def bert_ladder(blocks: int) -> Ladder:
    rename = Rename(
        "TF BERT checkpoint scopes: transformers' load_tf_weights_in_bert reads `layer_<i>` "
        "as `layer.<i>`; ELECTRA's task heads live under `task_specific/`",
        (
            (r"bert/embeddings/(.+)", r"bert/embeddings/\1"),
            (r"bert/encoder/layer/(\d+)/(.+)", r"bert/encoder/layer_\1/\2"),
            (r"bert/pooler/(.+)", r"bert/pooler/\1"),
            (r"classifier/(.+)", r"task_specific/classifier/\1"),
        ),
        sep="/",
    )
    return Ladder("ELECTRA _get_layer_lrs", rename, electra_depth, blocks)


def _bert_torch() -> Rename:
    return Rename(
        "transformers' PyTorch BERT: the Flax module path, `.`-joined",
        ((r"(.+)", r"\1"),),
        leaf_names=TORCH_LEAF_NAMES,
    )


def _bitfit(name: str, blocks: int) -> bool:
    # GLUEvaluator._deactivate_relevant_gradients with trainable_components ["bias"]
    # (BIAS_TERMS_DICT["all"]): everything frozen, then trained where a component is a
    # substring of the name; `pooler.dense.bias` is added when components are given, and
    # `classifier` always.
    return any(c in name for c in ("bias", "pooler.dense.bias", "classifier"))


def _bert_first_layers(k: int) -> Callable[[str, int], bool]:
    def trains(name: str, blocks: int) -> bool:
        # `for p in model.bert.embeddings.parameters(): p.requires_grad = False` and the
        # same for `model.bert.encoder.layer[:k]`.
        frozen = name.startswith("bert.embeddings.") or any(
            name.startswith(f"bert.encoder.layer.{i}.") for i in range(k)
        )
        return not frozen

    return trains


def bert_freezings(blocks: int) -> list[Freezing]:
    return [
        Freezing("bitfit", "BitFit (Ben Zaken et al. 2022), glue_evaluator.py",
                 _bert_torch(), _bitfit, blocks),
        Freezing("embeddings_and_first_layer",
                 "frozen `model.bert.embeddings` and `model.bert.encoder.layer[:1]`",
                 _bert_torch(), _bert_first_layers(1), blocks),
    ]


def _hf_vit() -> Rename:
    return Rename(
        "transformers convert_vit_timm_to_pytorch.py create_rename_keys, right to left",
        (
            (r"vit/embeddings/cls_token", "cls_token"),
            (r"vit/embeddings/position_embeddings", "pos_embed"),
            (r"vit/embeddings/patch_embeddings/projection/(kernel|bias)", r"patch_embed/proj/\1"),
            (r"vit/encoder/layer/(\d+)/(.+)", r"blocks/\1/\2"),
            (r"vit/layernorm/(scale|bias)", r"norm/\1"),
            (r"classifier/(kernel|bias)", r"head/\1"),
        ),
        leaf_names=TORCH_LEAF_NAMES,
    )


def vit_ladder(blocks: int) -> Ladder:
    return Ladder(
        "MAE get_layer_id_for_vit", _hf_vit(), lambda n, b: mae_layer_id(n, b + 1), blocks
    )


def _mae_linear_probe(name: str, blocks: int) -> bool:
    # main_linprobe.py: `for _, p in model.named_parameters(): p.requires_grad = False`,
    # then `for _, p in model.head.named_parameters(): p.requires_grad = True`.
    return name.startswith("head.")


def _mae_partial(k: int) -> Callable[[str, int], bool]:
    def trains(name: str, blocks: int) -> bool:
        # MAE (He et al. 2022), "partial fine-tuning": the last k blocks, the final norm
        # and the head are trained; the patch embedding, tokens, position embedding and
        # the other blocks frozen.
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return False
        if name.startswith("blocks."):
            return int(name.split(".")[1]) >= blocks - k
        return True

    return trains


def vit_freezings(blocks: int) -> list[Freezing]:
    return [
        Freezing("linear_probe", "MAE main_linprobe.py", _hf_vit(), _mae_linear_probe, blocks),
        Freezing("last_block", "MAE partial fine-tuning, k = 1", _hf_vit(), _mae_partial(1),
                 blocks),
    ]


def beit_shared_bias_ladder(blocks: int) -> Ladder:
    rename = Rename(
        "transformers convert_beit_unilm_to_pytorch.py create_rename_keys and "
        "read_in_q_k_v (gamma_<i> kept as lambda_<i>), right to left",
        (
            (r"beit/embeddings/cls_token", "cls_token"),
            (r"beit/embeddings/patch_embeddings/projection/(kernel|bias)", r"patch_embed/proj/\1"),
            (
                r"beit/encoder/relative_position_bias/relative_position_bias_table",
                "rel_pos_bias/relative_position_bias_table",
            ),
            (r"beit/encoder/layer/(\d+)/(.+)", r"blocks/\1/\2"),
            (r"beit/pooler/layernorm/(scale|bias)", r"fc_norm/\1"),
            (r"classifier/(kernel|bias)", r"head/\1"),
        ),
        leaf_names=TORCH_LEAF_NAMES,
    )
    return Ladder(
        "BEiT get_num_layer_for_vit", rename, lambda n, b: beit_layer_id(n, b + 2), blocks
    )


# --- equimo 1.1.0, Equinox ----------------------------------------------------------------


def _equimo_rename(depths: Sequence[int]) -> Rename:
    offsets = [sum(depths[:c]) for c in range(len(depths))]

    def chunked(found: re.Match[str]) -> str:
        # DINOv2's chunked blocks (`blocks.<chunk>.<i>`) number i across the whole
        # model (each chunk is padded with Identity); equimo's BlockChunk restarts at 0.
        chunk, i, rest = int(found.group(1)), int(found.group(2)), found.group(3)
        return f"blocks/{chunk}/{offsets[chunk] + i}/{rest}"

    return Rename(
        "equimo's ViT keeps DINOv2/v3's attribute names, but `reg_tokens` for DINOv3's "
        "`storage_tokens` and chunk-local block indices",
        (
            (r"reg_tokens", "storage_tokens"),
            (r"(cls_token|mask_token)", r"\1"),
            (r"blocks/(\d+)/blocks/(\d+)/(.+)", chunked),
            (r"(patch_embed|global_pos_embed|norm|head)/(.+)", r"\1/\2"),
        ),
    )


def equimo_vit_ladder(depths: Sequence[int]) -> Ladder:
    # DINOv3's get_params_groups_with_decay takes n_blocks = len(model.blocks), which is
    # the number of chunks for a chunked model; DINOv2's chunked models carry n_blocks,
    # the number of blocks. The reference uses the latter.
    return Ladder(
        "DINOv3 get_vit_lr_decay_rate (chunked)",
        _equimo_rename(depths),
        lambda n, b: dinov3_layer_id(n, b, chunked_blocks=True),
        sum(depths),
    )


def _mocov3_frozen_patch_projection(name: str, blocks: int) -> bool:
    # moco-v3 vits.py, stop_grad_conv1: `self.patch_embed.proj.weight.requires_grad =
    # False` and the same for `.bias`.
    return name not in ("patch_embed.proj.weight", "patch_embed.proj.bias")


def equimo_vit_freezings(depths: Sequence[int]) -> list[Freezing]:
    blocks = sum(depths)
    return [
        Freezing("frozen_patch_projection", "MoCo v3 stop_grad_conv1",
                 _equimo_rename(depths), _mocov3_frozen_patch_projection, blocks),
        Freezing("linear_probe", "MAE main_linprobe.py", _equimo_rename(depths),
                 _mae_linear_probe, blocks),
    ]


# --- a ViT with big_vision's module names (tests/zoo/test_zoo_groups.py) ------------------


def big_vision_rename(*, scan: bool, pool: str) -> Rename:
    """timm's ``_load_weights`` for big_vision checkpoints, right to left: ``embedding``
    -> ``patch_embed.proj``, ``pos_embedding`` -> ``pos_embed``, ``cls`` ->
    ``cls_token``, ``Transformer/encoderblock_<i>`` -> ``blocks.<i>``,
    ``Transformer/encoder_norm`` -> ``norm``, ``MAPHead_0`` -> ``attn_pool`` (its
    ``probe`` -> ``latent``). Under ``nn.scan`` (``variable_axes={"params": 0}``), index
    i of ``Transformer/encoderblock``'s first axis is block i."""
    rules: list[tuple[str, Replacement]] = [
        (r"embedding/(kernel|bias)", r"patch_embed/proj/\1"),
        (r"pos_embedding", "pos_embed"),
    ]
    if pool == "tok":
        rules.append((r"cls", "cls_token"))
    if scan:
        rules.append((r"Transformer/encoderblock/(.+)", r"blocks/{layer}/\1"))
    else:
        rules.append((r"Transformer/encoderblock_(\d+)/(.+)", r"blocks/\1/\2"))
    rules.append((r"Transformer/encoder_norm/(scale|bias)", r"norm/\1"))
    if pool == "map":
        rules += [(r"MAPHead_0/probe", "attn_pool/latent"), (r"MAPHead_0/(.+)", r"attn_pool/\1")]
    rules.append((r"head/(kernel|bias)", r"head/\1"))
    return Rename("timm _load_weights (big_vision checkpoints)", tuple(rules),
                  leaf_names=TORCH_LEAF_NAMES)


def big_vision_ladder(depth: int, *, scan: bool, pool: str) -> Ladder:
    return Ladder(
        "MAE get_layer_id_for_vit",
        big_vision_rename(scan=scan, pool=pool),
        lambda n, b: mae_layer_id(n, b + 1),
        depth,
    )


def big_vision_schedule(patterns: Sequence[tuple[str, Any]]) -> Callable[[str, int], bool]:
    """big_vision ``optax.make``: the first pattern that ``fullmatch``-es the
    ``/``-joined name gives its schedule (``utils.make_mask_trees``); ``None`` freezes."""

    def trains(name: str, blocks: int) -> bool:
        for pattern, schedule in patterns:
            if re.fullmatch(pattern, name):
                return schedule is not None
        return True

    return trains


def big_vision_freezings(depth: int, *, scan: bool, pool: str) -> list[Freezing]:
    own = Rename("big_vision's own names", ((r"(.+)", r"\1"),), sep="/")
    return [
        Freezing("linear_probe", "big_vision config.schedule [('head/.*', {...}), ('.*', None)]",
                 own, big_vision_schedule([("head/.*", {}), (".*", None)]), depth),
        Freezing("frozen_patch_projection",
                 "MoCo v3 stop_grad_conv1 on timm's names of a big_vision checkpoint",
                 big_vision_rename(scan=scan, pool=pool), _mocov3_frozen_patch_projection, depth),
    ]


# --- where decaymask's documented ladder deliberately differs from a recipe ----------------

# (reason, applies(recipe's name, the recipe's id, decaymask's id, number of blocks))
DIFFERENCES: list[tuple[str, Callable[[str, Any, Any, int], bool]]] = [
    (
        "BEiT's get_num_layer_for_vit gives the shared relative position bias "
        "(`rel_pos_bias`) the head's id n + 1; decaymask's documented ladder puts position "
        "tables outside the blocks in the stem, id 0",
        lambda name, want, got, n: name.startswith("rel_pos_bias") and want == n + 1 and got == 0,
    ),
]


def documented(name: str | tuple[str, ...], want: Any, got: Any, blocks: int) -> str | None:
    """The reason a documented difference explains ``got`` where the recipe says ``want``."""
    if isinstance(name, tuple):
        return None
    for reason, applies in DIFFERENCES:
        if applies(name, want, got, blocks):
            return reason
    return None
