"""The plain registry of sparse-format decoders, keyed by the format name the sniffer reports.

Each entry names its decoder as "module:Class", imported by decoder_class() the first time a job meets that
format: a raw job never loads the VHDX or VMDK parsers. `fmt in DECODERS` and iterating over the names
import nothing.

Raw and ISO are not here: they are the file itself, read by the stream's fast path (stages.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.formats.layout import Decoder

DECODERS: dict[str, str] = {
    "qcow2": "pipeline.formats.qcow2:Qcow2Decoder",
    "vhdx": "pipeline.formats.vhdx:VhdxDecoder",
    "vhd": "pipeline.formats.vhd:VhdDecoder",
    "vdi": "pipeline.formats.vdi:VdiDecoder",
    "vmdk": "pipeline.formats.vmdk:VmdkDecoder",
}


def decoder_class(fmt: str) -> type[Decoder]:
    """The decoder class of a format in DECODERS (KeyError otherwise), its module imported on first use."""
    module, _, name = DECODERS[fmt].partition(":")
    cls: type[Decoder] = getattr(importlib.import_module(module), name)
    return cls
