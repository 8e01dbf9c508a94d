"""FUSE sessions: what reads the kernel's requests and writes the replies (see types.py)."""
