"""mackay_ext: MacKay evidence-framework (ARD) compression for PyTorch.

Each weight, or group of weights, has a Gaussian prior precision alpha that MacKay's rule
re-estimates from a diagonal curvature estimate; weights whose alpha runs to infinity are pruned.
"""
from ._extension import compiled_backends
from . import data, models, ops, optim, reference
from .ops import UpdateStats, mackay_update_
from .optim import MacKayAdam, ard_param_groups
from .pruner import MacKayPruner
from .pruner_claims import attached_pruners
from . import sparse
from .sparse import SparseConv2d, SparseLinear, densify, load_compressed, save_compressed, sparsify
from .compressed import read_metadata
from ._validate import NonFiniteError
from ._files import CorruptFileError, UnsafeFileError
from . import coupling, recipes, recipes_cifar, train
from .coupling import ChannelGroup, CouplingError, channel_groups, group_index
from .shrink import ShrinkReport, count_macs, shrink

__all__ = ["compiled_backends", "ops", "optim", "reference", "UpdateStats", "mackay_update_",
           "MacKayAdam", "ard_param_groups", "MacKayPruner", "attached_pruners", "data", "models", "sparse",
           "SparseLinear", "SparseConv2d", "sparsify", "save_compressed", "load_compressed",
           "read_metadata",           "densify", "NonFiniteError", "CorruptFileError", "UnsafeFileError", "train", "recipes",
           "recipes_cifar",
           "coupling", "ChannelGroup", "CouplingError", "channel_groups", "group_index",
           "ShrinkReport", "count_macs", "shrink"]
__version__ = "0.1.0"
