"""monai-fbta: end-to-end multiple-instance learning on whole-slide images (FBTA) for MONAI.

Importing the package prints nothing and writes no files: cuCIM's cuFile log is pointed away
from the working directory before cuCIM can be imported (see :mod:`monai_fbta._quiet`).
"""

from monai_fbta._quiet import configure_environment

configure_environment()

__version__ = "0.1.0"
