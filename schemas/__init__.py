"""pydantic v2 models of the run manifest: the single source of truth for every knob."""
from schemas.manifest import STAGE_ORDER, Manifest, ManifestError, load_manifest, parse_manifest

__all__ = ["STAGE_ORDER", "Manifest", "ManifestError", "load_manifest", "parse_manifest"]
