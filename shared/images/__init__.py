"""Golden images: versions on disk (store.py) and the overlay's on-disk bitmap format (overlay_format.py).

Shared by the controller (image commands) and the iSCSI target (which opens a PC's overlay over a version).
"""
