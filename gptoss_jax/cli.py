"""Command-line flags the CLIs share: placement on a mesh and the multi-host job."""

from __future__ import annotations

import argparse

from jax.sharding import Mesh

from gptoss_jax import sharding


def add_mesh_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", help="run sharded, e.g. data=1,expert=8,model=1 (sizes must multiply to the device count)")
    parser.add_argument("--coordinator", help="multi-host: coordinator host:port (or JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, help="multi-host: process count (or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index (or JAX_PROCESS_ID)")


def mesh_from_flags(args: argparse.Namespace) -> Mesh | None:
    """Joins the multi-host job if one is configured, then builds the `--mesh` (None without one)."""
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    return sharding.make_mesh(**sharding.parse_mesh(args.mesh)) if args.mesh else None
