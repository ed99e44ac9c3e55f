"""SiloTune: split federated fine-tuning of LLMs on private data silos."""

__version__ = "0.1.0"
