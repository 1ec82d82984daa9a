"""isample: fast, exact importance sampling of training data for PyTorch.

The core is a float64 sum tree compiled in C++ (and CUDA where built):

>>> import isample
>>> tree = isample.SoftmaxTree(50_000, temperature=1.0)
>>> tree.update([3, 7], [2.5, 0.1])
>>> batch = tree.sample(128)
"""

from ._backend import build_info, cuda_available
from ._version import __version__
from .tree import SoftmaxTree, SumTree, uniforms

__all__ = ["SumTree", "SoftmaxTree", "uniforms", "build_info", "cuda_available", "__version__"]
