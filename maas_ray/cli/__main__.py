"""``python -m maas_ray.cli``: the same as the ``maas`` console script."""

from maas_ray.cli import main

raise SystemExit(main())
