"""Drop-in modules (state_dict-compatible with timm and the authors' code) and ``convert``."""
from .cbam import CBAM, cbam_state_dict_from_authors
from .convert import convert, register_converter

__all__ = ["CBAM", "cbam_state_dict_from_authors", "convert", "register_converter"]
