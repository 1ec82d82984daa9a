"""isample: fast, exact importance sampling of training data for PyTorch.

The core is a float64 sum tree compiled in C++; on top of it, a DataLoader sampler that
implements the seed paper's Algorithm 1, score policies and probability transforms. The
sampler's defaults are the recipe the project's studies back (the last loss, in proportion,
20% uniform, with replacement, unbiased weights); ``ImportanceSampler.paper`` is the seed
paper's own method:

>>> import isample
>>> sampler = isample.ImportanceSampler(50_000)
>>> paper = isample.ImportanceSampler.paper(50_000, score="running_loss")
>>> tree = isample.SoftmaxTree(50_000, temperature=1.0)
"""

from ._backend import build_info, cuda_available
from ._version import __version__
from .pruning import SoftPruningSampler
from .sampler import EpochSampler, ImportanceSampler, IndexedDataset
from .scores import EarlyImportance, GradNormBound, LastLoss, ReducibleLoss, RunningLoss, ScorePolicy
from .transforms import Proportional, RankBased, Softmax, Transform
from .tree import SoftmaxTree, SumTree, uniforms

__all__ = [
    "SumTree",
    "SoftmaxTree",
    "uniforms",
    "ImportanceSampler",
    "SoftPruningSampler",
    "EpochSampler",
    "IndexedDataset",
    "ScorePolicy",
    "LastLoss",
    "RunningLoss",
    "GradNormBound",
    "ReducibleLoss",
    "EarlyImportance",
    "Transform",
    "Softmax",
    "Proportional",
    "RankBased",
    "build_info",
    "cuda_available",
    "__version__",
]
