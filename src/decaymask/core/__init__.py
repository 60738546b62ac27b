"""The framework-neutral core: no jax, no equinox, no flax."""

from ._leaf import KIND_SOURCES as KIND_SOURCES
from ._leaf import Layer as Layer
from ._leaf import Leaf as Leaf
from ._policy import Policy as Policy
from ._registry import register_layer as register_layer
from ._registry import unregister_layer as unregister_layer
from ._report import Decision as Decision
from ._report import Report as Report
from ._rules import SELECTORS as SELECTORS
from ._rules import Rule as Rule
from ._imports import PolicyDataError as PolicyDataError
from ._rules import decay as decay
from ._rules import label as label
from ._rules import no_decay as no_decay
from ._group_rules import lr as lr
from ._group_rules import freeze as freeze
from ._group_rules import unfreeze as unfreeze
from ._ladder import LayerDecay as LayerDecay
from ._ladder import layer_decay as layer_decay
from ._vocab import GROUPS as GROUPS
from ._vocab import KINDS as KINDS
from ._vocab import ROLES as ROLES
from ._warnings import PolicyWarning as PolicyWarning
from ._warnings import UnmatchedRuleError as UnmatchedRuleError
