"""decaymask: one weight-decay policy, a correct optax mask in Equinox, Flax and Haiku."""

from .core import GROUPS as GROUPS
from .core import KIND_SOURCES as KIND_SOURCES
from .core import KINDS as KINDS
from .core import ROLES as ROLES
from .core import LayerGroup as LayerGroup
from .core import LayerKind as LayerKind
from .core import Role as Role
from .core import SELECTORS as SELECTORS
from .core import Decision as Decision
from .core import Layer as Layer
from .core import Leaf as Leaf
from ._face import Policy as Policy
from .core import PolicyWarning as PolicyWarning
from .core import Report as Report
from .core import Rule as Rule
from .core import UnmatchedRuleError as UnmatchedRuleError
from .core import PolicyDataError as PolicyDataError
from .core import decay as decay
from .core import label as label
from .core import no_decay as no_decay
from .core import lr as lr
from .core import freeze as freeze
from .core import unfreeze as unfreeze
from .core import LayerDecay as LayerDecay
from .core import layer_decay as layer_decay
from .core import register_layer as register_layer
from .core import unregister_layer as unregister_layer

from . import presets as presets
from ._check import MaskMismatchError as MaskMismatchError
from ._check import check_mask as check_mask
from ._transforms import add_decayed_weights as add_decayed_weights
from ._groups import merge as merge
from ._record import Recording as Recording
from ._record import record as record
from ._verify import Mismatch as Mismatch
from ._verify import VerifyError as VerifyError

__version__ = "0.1.0"

__all__ = [
    "GROUPS", "KINDS", "KIND_SOURCES", "ROLES", "SELECTORS",
    "Decision", "Layer", "LayerDecay", "LayerGroup", "LayerKind", "Leaf", "MaskMismatchError",
    "Mismatch", "Policy", "PolicyDataError", "PolicyWarning", "Recording", "Report", "Role",
    "Rule",
    "UnmatchedRuleError", "VerifyError",
    "add_decayed_weights", "check_mask", "decay", "freeze", "label", "layer_decay", "lr",
    "merge", "no_decay", "presets", "record", "register_layer", "unfreeze",
    "unregister_layer",
]
