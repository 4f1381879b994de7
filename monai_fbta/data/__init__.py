"""monai_fbta.data"""
