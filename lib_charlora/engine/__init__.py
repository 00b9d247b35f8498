"""Host-agnostic engine: LoRA layers, trainer loop, kohya export. Never imports a host."""
from .config import TrainConfig, validate_name
from .data import TrainImage
from .errors import CharLoraError, ConfigError, MissingPackageError, OutputExistsError, UnsupportedModelError
from .host import Component, Host
from .lora import LoRAModule, LoRANetwork, find_targets
from .trainer import CancelToken, Progress, Trainer, TrainResult

__all__ = ["TrainConfig", "validate_name", "TrainImage", "CharLoraError", "ConfigError", "MissingPackageError",
           "OutputExistsError", "UnsupportedModelError", "Component", "Host", "LoRAModule", "LoRANetwork",
           "find_targets", "CancelToken", "Progress", "Trainer", "TrainResult"]
