"""herd's parallelism: meshes and the functions that turn a model into a parallel one."""
from .clip import clip_grad_norm_
from .expert import AllToAllDispatcher, apply_expert_parallel
from .fp8 import Fp8Config, apply_fp8
from .fsdp import parallelize_model
from .mesh import Distributed, Meshes, build_mesh, init_distributed, mesh_shape

__all__ = ["AllToAllDispatcher", "Distributed", "Fp8Config", "Meshes", "apply_expert_parallel", "apply_fp8", "build_mesh",
           "clip_grad_norm_", "init_distributed", "mesh_shape", "parallelize_model"]
