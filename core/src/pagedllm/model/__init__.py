"""The model graph (layers, model classes) and the loaders that fill it from HF directories and GGUF files."""
