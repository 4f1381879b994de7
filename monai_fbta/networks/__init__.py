"""monai_fbta.networks"""
