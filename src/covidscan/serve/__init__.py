"""Web service around a ready :class:`covidscan.inference.Predictor` (``create_app``)."""

from covidscan.serve.app import create_app

__all__ = ["create_app"]
