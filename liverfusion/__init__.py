"""liverfusion: multi-modality MRI self-supervised learning (MDA + SimSiam) and CGC fusion classification.

Axis convention for the whole package: image tensors are (C, D, H, W) with D the slice (through-plane) axis,
usually the coarsest; sizes in configs are written D x H x W. NIfTI arrays (X, Y, Z) are transposed on load,
so D = Z, H = Y, W = X. "In-plane" means H x W.
"""

__version__ = "0.1.0"
