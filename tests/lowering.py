"""Lowering a kernel for H100 or TPU on this CPU-only machine (KERNELS.md 4.4).

`jax.jit(f).trace(...).lower(lowering_platforms=...)` runs the whole Pallas -> Triton / Mosaic lowering
without a device, which catches what interpret mode cannot (an op the GPU or TPU lowering lacks, a
block shape TPU tiling rejects). It does not run ptxas or libtpu's layout passes.
"""

from __future__ import annotations

import contextlib
import warnings

import jax

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
CUSTOM_CALL = {"cuda": "__gpu", "tpu": "tpu_custom_call"}  # what each Pallas backend emits


def lower(fn, *args, platform: str, **static) -> str:
    """StableHLO text of `fn(*args, **static)` lowered for `platform` ("cuda" or "tpu").

    `args` may be `jax.ShapeDtypeStruct`s; `static` are keyword arguments fixed at trace time.
    """
    device = contextlib.nullcontext()
    if platform == "cuda":  # jax >= 0.12 needs a GPU to lower for; an abstract H100 stands in
        device = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100))
    with device, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Pallas Triton backend's notice
        traced = jax.jit(lambda *a: fn(*a, **static)).trace(*args)
        return traced.lower(lowering_platforms=(platform,)).as_text()


def assert_lowers(fn, *args, platform: str, **static) -> None:
    """Lowers `fn` for `platform` and checks a Pallas kernel (not an XLA fallback) was emitted."""
    text = lower(fn, *args, platform=platform, **static)
    assert CUSTOM_CALL[platform] in text, f"no {CUSTOM_CALL[platform]} custom call in the {platform} lowering"
