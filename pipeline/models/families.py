"""Imports every family module so its adapter registers itself."""

from pipeline.models import mixtral  # noqa: F401
