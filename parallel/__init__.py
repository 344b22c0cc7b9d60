"""herd's parallelism: meshes and the functions that turn a model into a parallel one."""
from .clip import clip_grad_norm_
from .expert import AllToAllDispatcher, apply_expert_parallel
from .fsdp import parallelize_model
from .mesh import Distributed, Meshes, build_mesh, init_distributed, mesh_shape

__all__ = ["AllToAllDispatcher", "Distributed", "Meshes", "apply_expert_parallel", "build_mesh", "clip_grad_norm_",
           "init_distributed", "mesh_shape", "parallelize_model"]
