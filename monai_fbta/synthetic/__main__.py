"""``python -m monai_fbta.synthetic --out DIR --num-slides 12 --num-classes 3 --size 4096``."""

from monai_fbta.synthetic.cli import main

raise SystemExit(main())
