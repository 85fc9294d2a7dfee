"""Errors the engine raises for conditions a user can fix."""


class WeightsNotInstalledError(RuntimeError):
    """A backbone's ImageNet weights package is missing; the message says how to install it."""


class ImageLoadError(ValueError):
    """An image could not be decoded; the message says why (truncated, not an image, too large...)."""
