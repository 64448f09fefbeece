"""Torch-free types shared by ``mdp_trt``, ``profilers`` and ``solvers``: errors, the pruning
space, command-line plumbing and the version.

Imports go one way: ``mdp_trt`` uses ``profilers`` and ``solvers``, and all three use this
package, which imports none of them (nor torch or timm), so that ``import profilers.table``
stays light.
"""

__version__ = "0.1.0"
