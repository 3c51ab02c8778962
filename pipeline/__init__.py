"""imgpipe: stream VM disk images into qcow2 in one pass and constant memory."""

__version__ = "0.1.0"
