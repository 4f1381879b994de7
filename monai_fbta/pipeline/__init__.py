"""Glue used by the bundle configs: data preparation, preprocessing, prediction writing."""
