"""The bundle: one signed, reproducible file that carries models, their acceptance test
and their compression report from host to device. See ``docs/bundle.md``."""

from edgeagent.bundle.golden import GoldenSet, load_golden, save_golden
from edgeagent.bundle.manifest import (
    GOLDEN_PATH,
    LABELS_PATH,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    AcceptanceGate,
    CompressionStep,
    FileEntry,
    Manifest,
    ModelEntry,
    Preprocessing,
    Quantization,
    TensorSpec,
    parse_manifest,
)
from edgeagent.bundle.reader import Limits, VerifiedBundle, extract_bundle, verify_bundle
from edgeagent.bundle.writer import file_entries, write_bundle

__all__ = [
    "GOLDEN_PATH",
    "LABELS_PATH",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "AcceptanceGate",
    "CompressionStep",
    "FileEntry",
    "GoldenSet",
    "Limits",
    "Manifest",
    "ModelEntry",
    "Preprocessing",
    "Quantization",
    "TensorSpec",
    "VerifiedBundle",
    "extract_bundle",
    "file_entries",
    "load_golden",
    "parse_manifest",
    "save_golden",
    "verify_bundle",
    "write_bundle",
]
