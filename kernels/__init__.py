"""Log-probability kernels: plain-torch reference (CPU path, test oracle) and Triton (CUDA)."""
