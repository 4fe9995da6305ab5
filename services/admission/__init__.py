"""Admission: the GPU memory book. Grants VRAM leases under a cap per device."""
