"""fedpers: federated personalization of prompts on frozen backbones."""

__version__ = "0.1.0"
