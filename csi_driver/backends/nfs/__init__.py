from .backend import NfsBackend

__all__ = ["NfsBackend"]
