"""Where and how a computation runs, apart from what it computes: the torch device of a training or MD run,
'cpu', 'cuda', 'cuda:N' or 'auto' (devices.py), and the opt-in glibc setting that keeps freed tensor memory in the
process heap so that large cells do not pay page faults on every call (allocator.py)."""
