"""Drop-in modules (state_dict-compatible with timm, torchvision and the authors' code) and ``convert``."""
from .attention import Attention
from .bam import BAM, bam_state_dict_from_authors
from .cbam import CBAM, cbam_state_dict_from_authors
from .convert import NotConvertible, convert, register_converter, register_structural_converter
from .se import SqueezeExcite

__all__ = ["Attention", "BAM", "CBAM", "SqueezeExcite", "bam_state_dict_from_authors", "cbam_state_dict_from_authors", "convert", "NotConvertible", "register_converter",
           "register_structural_converter"]
