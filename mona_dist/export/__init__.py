"""`mona-dist export`: a run's backbone as one file, complete or merged into a plain timm state dict."""

from .merge import MERGEABLE, merged_trunk, write_backbone, write_timm

__all__ = ["MERGEABLE", "merged_trunk", "write_backbone", "write_timm"]
