"""Character LoRA: train a character LoRA in-process on the loaded Stable Diffusion model."""
__version__ = "0.1.0"
