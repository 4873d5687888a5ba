"""Modules that dispatch to t2i_fast.kernels: the only place that binds the kernels to diffusers."""
