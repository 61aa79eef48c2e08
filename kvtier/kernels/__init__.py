"""kvtier's native CPU kernels: the C++ sources (``csrc/``) and their build on first use (``loader``)."""
