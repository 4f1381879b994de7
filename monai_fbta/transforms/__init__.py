"""monai_fbta.transforms"""
