"""Garrison's data plane: the model, its parallel layers, the KV cache and the engine that runs on GPU nodes.

Nothing here imports the control plane (`garrison`); see DESIGN.md, "Dependency direction".
"""
