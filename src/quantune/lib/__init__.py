"""Helpers the stages share: config and recipes, data, models, measuring, prompts, LoRA, GGUF, TensorBoard."""
