"""The image store's errors (shared by the store and its helper modules)."""


class ImageStoreError(Exception):
    """An image command that cannot be done (the message names the image, version or file and why)."""


class SpaceError(ImageStoreError):
    """The change would leave less free space than the store's reserve."""
