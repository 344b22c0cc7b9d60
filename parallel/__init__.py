"""herd's parallelism: meshes and the functions that turn a model into a parallel one."""
from .fsdp import parallelize_model
from .mesh import Distributed, Meshes, build_mesh, init_distributed, mesh_shape

__all__ = ["parallelize_model", "build_mesh", "init_distributed", "mesh_shape", "Distributed", "Meshes"]
