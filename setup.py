from setuptools import find_packages, setup

# functransforms uses PyTorch's private dispatch APIs (_make_wrapper_subclass,
# _ForceDispatchKeyGuard, dispatch key sets), which change between releases. It is tested on
# torch 2.13.0 only; the upper bound keeps pip from pulling a newer (and CUDA) build.
setup(
    name="functransforms",
    version="0.1.0",
    description="JAX-like composable function transforms (vmap, grad, jvp, ...) for PyTorch",
    packages=find_packages(include=["functransforms", "functransforms.*"]),
    python_requires=">=3.10",
    # numpy: torch warns "Failed to initialize NumPy" on import without it.
    install_requires=["torch>=2.13.0,<2.14", "numpy"],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "expecttest",
            "nbclient",
            "nbformat",
            "ipykernel",
            "matplotlib",
        ],
        # Sampling profiler for the benchmarks' hot paths; whoever profiles installs it.
        "profile": ["py-spy"],
    },
)
