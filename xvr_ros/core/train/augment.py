"""Intensity augmentations of training images (never geometric: they would change the pose label)."""

from __future__ import annotations

import torch

from xvr_ros.core.imaging import gaussian_blur


def augment(img: torch.Tensor, generator: torch.Generator, p: float = 0.333) -> torch.Tensor:
    """Random intensity augmentations of (B, 1, H, W) images scaled to [0, 1], each with probability p.

    Noise, local contrast equalisation, blur, sharpen, gamma, random rectangular masking and
    simulated collimation — never geometric.
    """
    B, _, H, W = img.shape
    out = []
    for x in img.split(1):
        def coin():
            return float(torch.rand((), generator=generator)) < p

        def uniform(lo, hi):
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        if coin():  # gamma: detectors and post-processing bend the intensity curve
            x = x.clamp(min=0) ** uniform(0.7, 1.8)
        if coin():  # local contrast equalisation, as CLAHE-like post-processing does
            local = gaussian_blur(x, uniform(4, 12))
            x = (x + uniform(0.5, 2.0) * (x - local)).clamp(0, 1)
        if coin():
            x = gaussian_blur(x, uniform(0.5, 1.5))
        if coin():  # sharpen (unsharp mask)
            x = (x + uniform(0.3, 1.0) * (x - gaussian_blur(x, 1.0))).clamp(0, 1)
        if coin():
            x = x + uniform(0.005, 0.03) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        if coin():  # random rectangular masking (erasing)
            h, w = int(uniform(0.05, 0.3) * H), int(uniform(0.05, 0.3) * W)
            r, c = int(uniform(0, H - h)), int(uniform(0, W - w))
            x = x.clone()
            x[..., r : r + h, c : c + w] = uniform(0, 1)
        if coin():  # simulated collimation: zero a margin on each side
            m = [int(uniform(0, 0.12) * s) for s in (H, H, W, W)]
            x = x.clone()
            x[..., : m[0], :] = 0
            x[..., H - m[1] :, :] = 0
            x[..., :, : m[2]] = 0
            x[..., :, W - m[3] :] = 0
        out.append(x)
    return torch.cat(out)


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo + 1e-6)
