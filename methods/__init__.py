"""Adaptation methods, one file each; every module registers its `Method` on import."""
