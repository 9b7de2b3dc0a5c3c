"""The differentiable DRR renderer and its ray-integration kernels (C++ and torch)."""
