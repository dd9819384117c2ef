"""The data path: the slot-indexed LoRA engine and the Ray Serve deployments around it.

Importing this package imports neither Ray nor torch; each module pulls in what it needs.
"""
