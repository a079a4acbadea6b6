"""The Cambrian model: config, vision towers, connector, LLM wrapper, checkpoint I/O."""
from .config import CambrianConfig, ConfigError
from .connector import ConnectorOutput, build_connector
from .modeling import CambrianForCausalLM
from .builder import CheckpointError, LoadedModel, load_pretrained_model, save_pretrained

__all__ = ["CambrianConfig", "ConfigError", "ConnectorOutput", "build_connector", "CambrianForCausalLM",
           "CheckpointError", "LoadedModel", "load_pretrained_model", "save_pretrained"]
