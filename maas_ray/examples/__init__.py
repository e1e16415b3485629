"""The shipped example YAMLs as package data, so ``maas quickstart`` finds them from a wheel.

Each file here is a relative symlink to the canonical copy under the repository's
``deployments/`` (what users ``serve run`` and the README names): one source of truth.
Building a wheel or sdist copies the symlinks' contents, so an installed ``maas_ray`` holds real
files; read them with ``importlib.resources.files("maas_ray.examples")``.
"""
