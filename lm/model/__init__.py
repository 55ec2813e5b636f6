"""The decoder and what shapes it: the mesh and its logical-axis rules, attention kernels, LoRA adapters,
and KV-cache sampling."""
