"""deepjax: DeepSeek-V3/R1 in JAX. Modules are imported where used (`from deepjax import model`), so importing
the package itself stays free of jax."""

__version__ = "0.1.0"
