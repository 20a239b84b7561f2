"""The one compiled module: the relay of established sessions (Linux: epoll, eventfd).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wsgate.gateway._relay",
            ["src/wsgate/gateway/_relay.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
