"""The HTTP API: ``create_app`` builds it from one ``Settings``."""

from service.api.app import create_app

__all__ = ["create_app"]
