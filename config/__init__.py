"""Settings from the environment, and the factories that pick implementations from them."""

from config.settings import ConfigError, Settings, get_settings, reset_settings

__all__ = ["ConfigError", "Settings", "get_settings", "reset_settings"]
