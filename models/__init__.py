"""What a model is: the on-disk store, safetensors-only loading, and one engine per task.

This package is the ground floor: it imports neither Ray nor HTTP nor any other Loom package.
"""
