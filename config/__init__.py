"""Settings from the environment, read once by each entry point and handed down."""

from config.settings import ConfigError, Settings, get_settings

__all__ = ["ConfigError", "Settings", "get_settings"]
