"""The plain registry of sparse-format decoders, keyed by the format name the sniffer reports.

Raw and ISO are not here: they are the file itself, read by the stream's fast path (stages.py).
"""

from __future__ import annotations

from pipeline.formats.layout import Decoder
from pipeline.formats.qcow2 import Qcow2Decoder
from pipeline.formats.vdi import VdiDecoder
from pipeline.formats.vhd import VhdDecoder
from pipeline.formats.vhdx import VhdxDecoder
from pipeline.formats.vmdk import VmdkDecoder

DECODERS: dict[str, type[Decoder]] = {
    "qcow2": Qcow2Decoder,
    "vhdx": VhdxDecoder,
    "vhd": VhdDecoder,
    "vdi": VdiDecoder,
    "vmdk": VmdkDecoder,
}
