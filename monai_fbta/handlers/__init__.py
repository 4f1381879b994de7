"""monai_fbta.handlers"""
