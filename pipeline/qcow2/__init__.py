"""qcow2: the header and the one-pass writer."""
