"""Loom's own small model families: plain ``nn.Module``s saved as safetensors plus a JSON
config that names the family (``{"family": "digits", "arch": "mlp", ...}``)."""
