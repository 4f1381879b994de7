"""monai_fbta.engines"""
