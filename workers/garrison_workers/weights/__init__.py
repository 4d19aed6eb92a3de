"""Where weights come from: HF safetensors directories, GGUF files (and, later, the encrypted store)."""
