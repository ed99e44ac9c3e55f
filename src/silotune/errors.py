"""Error types: every user-facing failure is a SiloTuneError carrying one clear line."""


class SiloTuneError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits non-zero, no traceback."""


class ConfigError(SiloTuneError):
    """A malformed or inconsistent configuration (file, key or value)."""


class DataError(SiloTuneError):
    """A missing, unreadable or malformed data file or row."""


class ModelError(SiloTuneError):
    """A model that cannot be loaded, an unknown architecture or an impossible partition."""


class ProtocolError(SiloTuneError):
    """A message that breaks the client-server protocol (wrong type, shape, dtype, order)."""


class StepAborted(ProtocolError):
    """The server dropped this client's step (its turn expired, or the server restarted): redo the step."""
